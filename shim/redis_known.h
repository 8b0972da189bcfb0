/* redis_known.h — answers a protocol = redis upstream gave that depend on nothing but the
 * server, kept to answer the same question again without a round trip (redis_known.c). */
#ifndef HTTPSHIM_REDIS_KNOWN_H
#define HTTPSHIM_REDIS_KNOWN_H
#include <stddef.h>

#define REDIS_KNOWN_KEY_MAX   160      /* longer questions are not kept */
#define REDIS_KNOWN_REPLY_MAX 4096     /* nor longer answers */

/* The key for a question: tag, then each part with its length before it (any bytes may be
 * in them), written to out (REDIS_KNOWN_KEY_MAX bytes). 0 when it does not fit. */
size_t redis_known_key(char *out, const char *tag, const char *a, size_t an, const char *b, size_t bn);
/* Keeps reply as the answer to key for upstream up (the first one kept stays). */
void redis_known_keep(int up, const char *key, size_t key_len, const char *reply, size_t n);
/* The answer kept for key, or NULL. */
const char *redis_known_get(int up, const char *key, size_t key_len, size_t *n);
/* Everything kept for up: a server connection was lost, and the server that answers next
 * may be another (restarted, upgraded, failed over). */
void redis_known_forget(int up);
void redis_known_forget_parents(void);   /* forked child: the parent's, unreachable */
#endif
