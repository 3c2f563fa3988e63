/* What the C load generators (leanload.c, manyconn.c) share: hex arguments,
 * and the WebSocket upgrade of a fresh connection to a dcache node. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static unsigned char *unhex(const char *s, size_t *n) {
    size_t len = strlen(s) / 2;
    unsigned char *out = malloc(len);
    for (size_t i = 0; i < len; i++) sscanf(s + 2 * i, "%2hhx", &out[i]);
    *n = len;
    return out;
}

/* Send the upgrade request on fd and read the 101 response (it ends with a
 * blank line); what came after it stays in buf (*have bytes). 0, or -1. */
static int ws_upgrade(int fd, const char *host, const char *port, unsigned char *buf, size_t cap, size_t *have) {
    char req[512];
    int len = snprintf(req, sizeof req,
        "GET / HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", host, port);
    for (int sent = 0; sent < len;) {
        ssize_t w = send(fd, req + sent, (size_t)(len - sent), 0);
        if (w < 0) return -1;
        sent += (int)w;
    }
    *have = 0;
    for (;;) {
        ssize_t r = recv(fd, buf + *have, cap - *have, 0);
        if (r <= 0) return -1;
        *have += (size_t)r;
        unsigned char *end = memmem(buf, *have, "\r\n\r\n", 4);
        if (end) {
            size_t used = (size_t)(end + 4 - buf);
            memmove(buf, buf + used, *have - used);
            *have -= used;
            return 0;
        }
    }
}
