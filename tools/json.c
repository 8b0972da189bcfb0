/* json.c — the CLI's JSON: a recursive-descent parser with a depth cap, a deep copy,
 * a summing merge and a compact printer. Input comes from our own stats sockets, but
 * it is parsed as untrusted all the same. */
#include "json.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define JSON_MAX_DEPTH 32

struct parser { const char *p, *end; int depth; };

static void skip_ws(struct parser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\n' || *ps->p == '\r' || *ps->p == '\t'))
        ps->p++;
}

static struct json *parse_value(struct parser *ps);

static char *parse_string(struct parser *ps)
{
    if (ps->p >= ps->end || *ps->p != '"')
        return NULL;
    ps->p++;
    size_t cap = 16, n = 0;
    char *s = malloc(cap);
    if (!s)
        return NULL;
    while (ps->p < ps->end && *ps->p != '"') {
        char c = *ps->p++;
        if (c == '\\' && ps->p < ps->end) {
            char e = *ps->p++;
            c = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e == 'b' ? '\b' : e == 'f' ? '\f' : e;
            if (e == 'u') {            /* keep it simple: \uXXXX below 0x80 only, else '?' */
                unsigned v = 0;
                for (int i = 0; i < 4 && ps->p < ps->end; i++, ps->p++)
                    v = v * 16 + (unsigned)(*ps->p >= 'a' ? *ps->p - 'a' + 10 : *ps->p >= 'A' ? *ps->p - 'A' + 10 : *ps->p - '0');
                c = v < 0x80 ? (char)v : '?';
            }
        }
        if (n + 2 > cap) {
            char *g = realloc(s, cap *= 2);
            if (!g) {
                free(s);
                return NULL;
            }
            s = g;
        }
        s[n++] = c;
    }
    if (ps->p >= ps->end) {
        free(s);
        return NULL;
    }
    ps->p++;
    s[n] = 0;
    return s;
}

static struct json *parse_members(struct parser *ps, struct json *j, char close, bool keyed)
{
    ps->p++;
    struct json **tail = &j->child;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        return j;
    }
    for (;;) {
        skip_ws(ps);
        char *key = NULL;
        if (keyed) {
            key = parse_string(ps);
            skip_ws(ps);
            if (!key || ps->p >= ps->end || *ps->p != ':') {
                free(key);
                json_free(j);
                return NULL;
            }
            ps->p++;
        }
        struct json *v = parse_value(ps);
        if (!v) {
            free(key);
            json_free(j);
            return NULL;
        }
        v->key = key;
        *tail = v;
        tail = &v->next;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            return j;
        }
        json_free(j);
        return NULL;
    }
}

static struct json *parse_value(struct parser *ps)
{
    skip_ws(ps);
    if (ps->p >= ps->end || ++ps->depth > JSON_MAX_DEPTH)
        return NULL;
    struct json *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    char c = *ps->p;
    struct json *r = j;
    if (c == '{') {
        j->type = JSON_OBJECT;
        r = parse_members(ps, j, '}', true);
    } else if (c == '[') {
        j->type = JSON_ARRAY;
        r = parse_members(ps, j, ']', false);
    } else if (c == '"') {
        j->type = JSON_STRING;
        if (!(j->string = parse_string(ps))) {
            free(j);
            r = NULL;
        }
    } else if (ps->end - ps->p >= 4 && !memcmp(ps->p, "true", 4)) {
        j->type = JSON_BOOL, j->number = 1, ps->p += 4;
    } else if (ps->end - ps->p >= 5 && !memcmp(ps->p, "false", 5)) {
        j->type = JSON_BOOL, ps->p += 5;
    } else if (ps->end - ps->p >= 4 && !memcmp(ps->p, "null", 4)) {
        ps->p += 4;
    } else {
        char tmp[64];
        size_t n = 0;
        while (ps->p + n < ps->end && n < sizeof tmp - 1 && strchr("+-0123456789.eE", ps->p[n]))
            n++;
        memcpy(tmp, ps->p, n);
        tmp[n] = 0;
        char *endp;
        j->type = JSON_NUMBER;
        j->number = strtod(tmp, &endp);
        if (n == 0 || *endp) {
            free(j);
            r = NULL;
        }
        ps->p += n;
    }
    ps->depth--;
    return r;
}

struct json *json_parse(const char *text, size_t len)
{
    struct parser ps = { text, text + len, 0 };
    struct json *j = parse_value(&ps);
    skip_ws(&ps);
    if (j && ps.p != ps.end) {
        json_free(j);
        return NULL;
    }
    return j;
}

void json_free(struct json *j)
{
    while (j) {
        struct json *next = j->next;
        json_free(j->child);
        free(j->string);
        free(j->key);
        free(j);
        j = next;
    }
}

struct json *json_get(const struct json *obj, const char *key)
{
    if (!obj || obj->type != JSON_OBJECT)
        return NULL;
    for (struct json *c = obj->child; c; c = c->next)
        if (c->key && !strcmp(c->key, key))
            return c;
    return NULL;
}

double json_num(const struct json *obj, const char *key)
{
    const struct json *v = json_get(obj, key);
    return v && v->type == JSON_NUMBER ? v->number : 0;
}

struct json *json_clone(const struct json *j)
{
    struct json *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->type = j->type;
    c->number = j->number;
    c->string = j->string ? strdup(j->string) : NULL;
    c->key = j->key ? strdup(j->key) : NULL;
    struct json **tail = &c->child;
    for (const struct json *m = j->child; m; m = m->next) {
        *tail = json_clone(m);
        if (!*tail)
            break;
        tail = &(*tail)->next;
    }
    return c;
}

void json_sum_into(struct json *dst, const struct json *src, bool in_buckets)
{
    if (dst->type == JSON_NUMBER && src->type == JSON_NUMBER) {
        dst->number += src->number;
        return;
    }
    if (dst->type != src->type || (dst->type != JSON_OBJECT && dst->type != JSON_ARRAY))
        return;
    if (dst->type == JSON_OBJECT) {
        for (const struct json *s = src->child; s; s = s->next) {
            struct json *d = json_get(dst, s->key);
            if (d) {
                json_sum_into(d, s, s->key && !strcmp(s->key, "buckets"));
            } else {
                struct json *c = json_clone(s);
                if (c) {
                    c->next = dst->child;
                    dst->child = c;
                }
            }
        }
        return;
    }
    struct json *d = dst->child;
    const struct json *s = src->child;
    for (int i = 0; d && s; d = d->next, s = s->next, i++) {
        if (in_buckets && d->type == JSON_ARRAY) {
            if (d->child && d->child->next && s->child && s->child->next)
                json_sum_into(d->child->next, s->child->next, false);   /* [bound, count] */
        } else {
            json_sum_into(d, s, false);
        }
    }
}

static void print_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            fprintf(f, "\\u%04x", (unsigned char)*s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

void json_print(FILE *f, const struct json *j)
{
    switch (j->type) {
    case JSON_NULL: fputs("null", f); break;
    case JSON_BOOL: fputs(j->number ? "true" : "false", f); break;
    case JSON_NUMBER:
        if (j->number == floor(j->number) && fabs(j->number) < 1e15)
            fprintf(f, "%.0f", j->number);
        else
            fprintf(f, "%.9g", j->number);
        break;
    case JSON_STRING: print_string(f, j->string); break;
    case JSON_ARRAY:
    case JSON_OBJECT:
        fputc(j->type == JSON_ARRAY ? '[' : '{', f);
        for (const struct json *c = j->child; c; c = c->next) {
            if (c != j->child)
                fputc(',', f);
            if (j->type == JSON_OBJECT) {
                print_string(f, c->key ? c->key : "");
                fputc(':', f);
            }
            json_print(f, c);
        }
        fputc(j->type == JSON_ARRAY ? ']' : '}', f);
        break;
    }
}
