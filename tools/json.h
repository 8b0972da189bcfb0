/* json.h — a small JSON reader/writer for the httpshim CLI (json.c): enough to read
 * every process's /stats document, sum them, and print the result. */
#ifndef HTTPSHIM_JSON_H
#define HTTPSHIM_JSON_H
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

enum json_type { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

struct json {
    enum json_type type;
    double number;                 /* JSON_NUMBER, JSON_BOOL */
    char *string;                  /* JSON_STRING; the key when inside an object */
    char *key;
    struct json *child, *next;     /* JSON_ARRAY / JSON_OBJECT members */
};

struct json *json_parse(const char *text, size_t len);   /* NULL on malformed input */
void json_free(struct json *j);
struct json *json_get(const struct json *obj, const char *key);
double json_num(const struct json *obj, const char *key);  /* 0 when absent */
/* Adds `src` into `dst`: numbers summed, objects merged by key, arrays by position.
 * Inside a "buckets" array the first element of each pair (the bound) is kept. */
void json_sum_into(struct json *dst, const struct json *src, bool in_buckets);
struct json *json_clone(const struct json *j);
void json_print(FILE *f, const struct json *j);
#endif
