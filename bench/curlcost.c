/* curlcost.c — libcurl on its own, doing what the engine asks of it for a pooled miss: N
 * GETs to one upstream over kept-alive connections, C transfers at once, easy handles
 * reused (reset between uses, as the engine does). Prints the CPU time (user + system, all
 * of this process) per transfer: the floor under the engine's own CPU per request, which
 * adds the app's socketpair hop and the cache side to it.
 *
 *     curlcost PORT [TRANSFERS [AT_ONCE [PATH]]]     (defaults 5000, 200, /bytes/100) */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>

static size_t discard(char *p, size_t size, size_t n, void *user)
{
    (void)p;
    (void)user;
    return size * n;
}

static double usec(struct timeval tv) { return (double)tv.tv_sec * 1e6 + (double)tv.tv_usec; }

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: curlcost PORT [TRANSFERS [AT_ONCE [PATH]]]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int total = argc > 2 ? atoi(argv[2]) : 5000, at_once = argc > 3 ? atoi(argv[3]) : 200;
    const char *path = argc > 4 ? argv[4] : "/bytes/100";
    if (port <= 0 || total <= 0 || at_once <= 0)
        return 2;
    char url[512];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", port, path);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURLM *multi = curl_multi_init();
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long)at_once);
    CURL **spare = calloc((size_t)at_once, sizeof *spare);
    if (!multi || !spare)
        return 1;
    int started = 0, done = 0, failed = 0, n_spare = 0, running = 0;
    while (done < total) {
        for (; started < total && started - done < at_once; started++) {
            CURL *e = n_spare ? spare[--n_spare] : curl_easy_init();
            if (!e)
                return 1;
            curl_easy_setopt(e, CURLOPT_URL, url);
            curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
            curl_multi_add_handle(multi, e);
        }
        curl_multi_perform(multi, &running);
        curl_multi_poll(multi, NULL, 0, 1000, NULL);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(multi, &left)))
            if (msg->msg == CURLMSG_DONE) {
                failed += msg->data.result != CURLE_OK;
                curl_multi_remove_handle(multi, msg->easy_handle);
                curl_easy_reset(msg->easy_handle);
                spare[n_spare++] = msg->easy_handle;
                done++;
            }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("transfers=%d at_once=%d failed=%d cpu_us_per_transfer=%.1f user_us=%.1f sys_us=%.1f\n", total, at_once,
           failed, (usec(ru.ru_utime) + usec(ru.ru_stime)) / total, usec(ru.ru_utime) / total,
           usec(ru.ru_stime) / total);
    for (int i = 0; i < n_spare; i++)
        curl_easy_cleanup(spare[i]);
    free(spare);
    curl_multi_cleanup(multi);
    curl_global_cleanup();
    return failed ? 1 : 0;
}
