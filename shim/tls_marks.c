/* tls_marks.c — owns the registry of the app's OpenSSL contexts that trust the shim's
 * CA: the mark each sends in its ClientHello (this process's random tag and the context's
 * number) and the trust store each context was configured with, so that the engine can
 * verify an upstream as that context would before it answers for it; and, per marked
 * ClientHello, how that connection itself verifies (its SSL's verification parameters and
 * security level, which may differ from its context's). A mark that is not
 * in the registry (another process's, a forged one, a freed context's) is worth nothing:
 * the connection is tunnelled. Thread-safe: contexts come and go on app threads, the
 * engine looks them up. */
#include "tls_marks.h"
#include "lazyssl.h"
#include <openssl/rand.h>
#include <pthread.h>
#include <string.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned char tag[8];
static bool have_tag;
static uint64_t next_id = 1;
static size_t n_marks;
static struct { uint64_t id; X509_STORE *store; } marks[TLS_MARKS_MAX];
static uint64_t next_hello = 1;
static struct { uint64_t hello; struct tls_app_view view; } views[TLS_HELLOS_MAX];   /* hello 0: free */

uint64_t tls_marks_add(X509_STORE *store)
{
    uint64_t id = 0;
    pthread_mutex_lock(&lock);
    if (!have_tag)
        have_tag = RAND_bytes(tag, sizeof tag) == 1;
    if (have_tag && n_marks < TLS_MARKS_MAX && store && X509_STORE_up_ref(store) == 1) {
        id = next_id++;
        marks[n_marks].id = id;
        marks[n_marks++].store = store;
    }
    pthread_mutex_unlock(&lock);
    return id;
}

static size_t find_locked(uint64_t id)
{
    for (size_t i = 0; i < n_marks; i++)
        if (marks[i].id == id)
            return i;
    return n_marks;
}

void tls_marks_set_store(uint64_t id, X509_STORE *store)
{
    X509_STORE *old = NULL;
    pthread_mutex_lock(&lock);
    size_t i = find_locked(id);
    if (i < n_marks && store && X509_STORE_up_ref(store) == 1) {
        old = marks[i].store;
        marks[i].store = store;
    }
    pthread_mutex_unlock(&lock);
    if (old)
        X509_STORE_free(old);
}

void tls_marks_drop(uint64_t id)
{
    X509_STORE *old = NULL;
    pthread_mutex_lock(&lock);
    size_t i = find_locked(id);
    if (i < n_marks) {
        old = marks[i].store;
        marks[i] = marks[--n_marks];
    }
    pthread_mutex_unlock(&lock);
    if (old)
        X509_STORE_free(old);
}

void tls_marks_bytes(uint64_t id, uint64_t hello, unsigned char out[TLS_MARK_LEN])
{
    memcpy(out, tag, sizeof tag);
    for (int i = 0; i < 8; i++) {
        out[8 + i] = (unsigned char)(id >> (8 * i));
        out[16 + i] = (unsigned char)(hello >> (8 * i));
    }
}

/* A hello whose connection the engine never hears (TLS to a host the shim does not
 * divert) leaves its view here until newer ones push it out: the slot of the oldest. */
bool tls_marks_store_unfilled(const X509_STORE *store)
{
    return OPENSSL_sk_num((const OPENSSL_STACK *)X509_STORE_get0_objects(store)) <= 1;
}

bool tls_marks_store_settled(const X509_STORE *store)
{
    return (X509_VERIFY_PARAM_get_flags(X509_STORE_get0_param(store)) & X509_V_FLAG_TRUSTED_FIRST) != 0;
}

uint64_t tls_marks_hello_add(X509_VERIFY_PARAM *param, int sec_level, bool store_unfilled)
{
    X509_VERIFY_PARAM *old = NULL;
    uint64_t hello = 0;
    pthread_mutex_lock(&lock);
    size_t slot = 0;
    for (size_t i = 0; i < TLS_HELLOS_MAX; i++) {
        if (!views[i].hello) {
            slot = i;
            break;
        }
        if (views[i].hello < views[slot].hello)
            slot = i;
    }
    if (param) {
        old = views[slot].hello ? views[slot].view.param : NULL;
        hello = next_hello++;
        views[slot].hello = hello;
        views[slot].view = (struct tls_app_view){ param, sec_level, store_unfilled };
    }
    pthread_mutex_unlock(&lock);
    if (old)
        X509_VERIFY_PARAM_free(old);
    return hello;
}

bool tls_marks_take_view(const unsigned char mark[TLS_MARK_LEN], struct tls_app_view *out)
{
    uint64_t hello = 0;
    for (int i = 0; i < 8; i++)
        hello |= (uint64_t)mark[16 + i] << (8 * i);
    bool found = false;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; hello && have_tag && !memcmp(mark, tag, sizeof tag) && i < TLS_HELLOS_MAX; i++)
        if (views[i].hello == hello) {
            *out = views[i].view;
            views[i].hello = 0;
            found = true;
            break;
        }
    pthread_mutex_unlock(&lock);
    return found;
}

uint64_t tls_marks_number(const unsigned char mark[TLS_MARK_LEN])
{
    uint64_t id = 0;
    for (int i = 0; i < 8; i++)
        id |= (uint64_t)mark[8 + i] << (8 * i);
    return id;
}

X509_STORE *tls_marks_store(const unsigned char mark[TLS_MARK_LEN])
{
    uint64_t id = tls_marks_number(mark) & ~TLS_MARK_CLIENT_CERT;
    X509_STORE *store = NULL;
    pthread_mutex_lock(&lock);
    if (have_tag && !memcmp(mark, tag, sizeof tag)) {
        size_t i = find_locked(id);
        if (i < n_marks && X509_STORE_up_ref(marks[i].store) == 1)
            store = marks[i].store;
    }
    pthread_mutex_unlock(&lock);
    return store;
}

bool tls_marks_checks_beyond_the_shim(const X509_STORE *store, const X509_VERIFY_PARAM *param)
{
    unsigned long crl = X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL;
    return X509_STORE_get_verify_cb(store) || (X509_VERIFY_PARAM_get_flags(X509_STORE_get0_param(store)) & crl)
           || (param && (X509_VERIFY_PARAM_get_flags(param) & crl));
}
