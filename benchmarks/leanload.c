#define _GNU_SOURCE
/* Lean GET load for benchmarks/compare.py: keeps pre-encoded WebSocket
 * frames of GETs in flight on one connection per node and counts replies,
 * so the load itself costs the machine next to nothing.
 *
 * usage: leanload SECONDS DEPTH HOST PORT HELLO_HEX FRAME_HEX REPLIES_PER_FRAME [HOST PORT ...]
 * prints the replies per second, then the replies counted. */
#include <arpa/inet.h>
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

#define MAXC 16
#define BUF (1 << 20)

struct conn { int fd; unsigned char *frame; size_t frame_len; unsigned char *buf; size_t have; };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void send_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, 0);
        if (w < 0) { perror("send"); exit(1); }
        p += w; n -= (size_t)w;
    }
}

/* Complete frames at the start of c->buf: returns replies counted, consumes them. */
static long take_replies(struct conn *c) {
    long replies = 0;
    size_t pos = 0;
    for (;;) {
        if (c->have - pos < 2) break;
        unsigned char *f = c->buf + pos;
        size_t n = f[1] & 0x7f, start = 2;
        if (n == 126) { if (c->have - pos < 4) break; n = (f[2] << 8) | f[3]; start = 4; }
        else if (n == 127) {
            if (c->have - pos < 10) break;
            n = 0; for (int i = 2; i < 10; i++) n = (n << 8) | f[i]; start = 10;
        }
        if (c->have - pos < start + n) break;
        unsigned char *p = f + start;
        if (p[0] < 0x98) replies += p[0] - 0x80;
        else if (p[0] == 0x98) replies += p[1];
        else replies += (p[1] << 8) | p[2];
        pos += start + n;
    }
    memmove(c->buf, c->buf + pos, c->have - pos);
    c->have -= pos;
    return replies;
}

int main(int argc, char **argv) {
    if (argc < 8 || (argc - 3) % 5) { fprintf(stderr, "usage: see the source\n"); return 2; }
    double seconds = atof(argv[1]);
    int depth = atoi(argv[2]);
    int nconn = (argc - 3) / 5;
    struct conn conns[MAXC];
    long per_frame[MAXC];
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn && i < MAXC; i++) {
        char **a = argv + 3 + 5 * i;
        struct conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(a[1]))};
        inet_pton(AF_INET, a[0], &sa.sin_addr);
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->buf = malloc(BUF);
        if (ws_upgrade(c->fd, a[0], a[1], c->buf, BUF, &c->have)) { fprintf(stderr, "handshake failed\n"); return 1; }
        size_t hello_len;
        unsigned char *hello = unhex(a[2], &hello_len);
        send_all(c->fd, hello, hello_len);
        while (take_replies(c) == 0) {  /* the hello's reply */
            ssize_t r = recv(c->fd, c->buf + c->have, BUF - c->have, 0);
            if (r <= 0) { fprintf(stderr, "no hello reply\n"); return 1; }
            c->have += (size_t)r;
        }
        c->frame = unhex(a[3], &c->frame_len);
        per_frame[i] = atol(a[4]);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    long done = 0;
    long owed[MAXC] = {0};
    for (int i = 0; i < nconn; i++)
        for (int d = 0; d < depth; d++) send_all(conns[i].fd, conns[i].frame, conns[i].frame_len);
    double start = now(), deadline = start + seconds;
    struct epoll_event events[MAXC];
    while (now() < deadline) {
        int n = epoll_wait(ep, events, MAXC, 100);
        for (int e = 0; e < n; e++) {
            int i = (int)events[e].data.u32;
            struct conn *c = &conns[i];
            ssize_t r = recv(c->fd, c->buf + c->have, BUF - c->have, 0);
            if (r <= 0) { fprintf(stderr, "connection lost\n"); return 1; }
            c->have += (size_t)r;
            long got = take_replies(c);
            done += got;
            owed[i] += got;
            while (owed[i] >= per_frame[i]) {  /* a frame's worth answered: send another */
                send_all(c->fd, c->frame, c->frame_len);
                owed[i] -= per_frame[i];
            }
        }
    }
    printf("%f %ld\n", done / (now() - start), done);
    return 0;
}
