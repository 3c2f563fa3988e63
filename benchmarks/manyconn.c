#define _GNU_SOURCE
/* Many-connection GET load for benchmarks/many.py: CONNS connections, one GET
 * in flight on each, as many web workers with a connection each would send.
 * Speaks dcache (WebSocket, a pre-encoded CBOR frame) or Redis (RESP), so the
 * same light load drives both servers; records every request's latency.
 *
 * usage: manyconn dcache|redis HOST PORT CONNS SECONDS [HELLO_HEX GET_FRAME_HEX]
 * prints: requests_per_second requests p50_us p99_us */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ws_upgrade.h"

#define BUF (1 << 16)
#define MAX_SAMPLES (4 << 20)

struct conn { int fd; unsigned char buf[BUF]; size_t have; double sent; };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void send_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, 0);
        if (w < 0) { if (errno == EAGAIN) continue; perror("send"); exit(1); }
        p += w; n -= (size_t)w;
    }
}

static int redis;

/* Length of the complete reply at the start of the buffer, or 0. */
static size_t reply_len(const unsigned char *b, size_t have) {
    if (redis) {  /* $N\r\n...\r\n, or $-1\r\n */
        unsigned char *eol = memmem(b, have, "\r\n", 2);
        if (!eol) return 0;
        long n = atol((const char *)b + 1);
        size_t head = (size_t)(eol - b) + 2;
        if (n < 0) return head;
        return have >= head + (size_t)n + 2 ? head + (size_t)n + 2 : 0;
    }
    if (have < 2) return 0;
    size_t n = b[1] & 0x7f, start = 2;
    if (n == 126) { if (have < 4) return 0; n = (b[2] << 8) | b[3]; start = 4; }
    else if (n == 127) return 0;  /* not for GETs of small values */
    return have >= start + n ? start + n : 0;
}

static int cmp(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: see the source\n"); return 2; }
    redis = strcmp(argv[1], "redis") == 0;
    int nconn = atoi(argv[4]);
    double seconds = atof(argv[5]);
    unsigned char *request;
    size_t request_len;
    if (redis) {
        request = (unsigned char *)"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";
        request_len = strlen((char *)request);
    } else {
        if (argc < 8) { fprintf(stderr, "dcache needs HELLO_HEX GET_FRAME_HEX\n"); return 2; }
        request = unhex(argv[7], &request_len);
    }
    struct conn *conns = calloc((size_t)nconn, sizeof *conns);
    float *samples = malloc(sizeof(float) * MAX_SAMPLES);
    long nsamples = 0;
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        struct conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &sa.sin_addr);
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (!redis) {
            if (ws_upgrade(c->fd, argv[2], argv[3], c->buf, BUF, &c->have)) { fprintf(stderr, "handshake failed\n"); return 1; }
            size_t hello_len;
            unsigned char *hello = unhex(argv[6], &hello_len);
            send_all(c->fd, hello, hello_len);
            while (!reply_len(c->buf, c->have)) {
                ssize_t r = recv(c->fd, c->buf + c->have, BUF - c->have, 0);
                if (r <= 0) { fprintf(stderr, "no hello reply\n"); return 1; }
                c->have += (size_t)r;
            }
            size_t n = reply_len(c->buf, c->have);
            memmove(c->buf, c->buf + n, c->have - n);
            c->have -= n;
            free(hello);
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    double start = now(), deadline = start + seconds;
    for (int i = 0; i < nconn; i++) {
        conns[i].sent = now();
        send_all(conns[i].fd, request, request_len);
    }
    long done = 0;
    struct epoll_event *events = malloc(sizeof *events * (size_t)nconn);
    double t;
    while ((t = now()) < deadline) {
        int n = epoll_wait(ep, events, nconn, 100);
        for (int e = 0; e < n; e++) {
            struct conn *c = &conns[events[e].data.u32];
            ssize_t r = recv(c->fd, c->buf + c->have, BUF - c->have, 0);
            if (r <= 0) { fprintf(stderr, "connection lost\n"); return 1; }
            c->have += (size_t)r;
            size_t len;
            while ((len = reply_len(c->buf, c->have))) {
                memmove(c->buf, c->buf + len, c->have - len);
                c->have -= len;
                double got = now();
                if (nsamples < MAX_SAMPLES) samples[nsamples++] = (float)((got - c->sent) * 1e6);
                done++;
                c->sent = got;
                send_all(c->fd, request, request_len);
            }
        }
    }
    double elapsed = now() - start;
    qsort(samples, (size_t)nsamples, sizeof *samples, cmp);
    float p50 = nsamples ? samples[nsamples / 2] : 0, p99 = nsamples ? samples[nsamples * 99 / 100] : 0;
    printf("%f %ld %.1f %.1f\n", done / elapsed, done, p50, p99);
    return 0;
}
