/*
 * The floor of a user-space hop, for scripts/bench: a TCP relay that does nothing but poll, read and
 * write. Every byte from a client goes to the upstream and back, unparsed. Whatever a proxy adds on
 * top of this (parsing, policy, bookkeeping, task hand-offs) is its own cost; what this costs is the
 * machine's (one more receive, one more send and one more wake-up each way per round trip).
 *
 * Usage: relay LISTEN_PORT UPSTREAM_PORT   (both on 127.0.0.1; one thread per connection)
 * Prints "ready" once listening. Its CPU time is that of one process (threads, not forks).
 */
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int upstream_port;

static int connect_upstream(void) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(upstream_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("relay: connect upstream");
        if (fd >= 0) close(fd);
        return -1;
    }
    return fd;
}

static int write_all(int fd, const char *p, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return -1;
        p += w;
        n -= w;
    }
    return 0;
}

static void *pump(void *arg) {
    int client = (int)(long)arg, one = 1;
    int up = connect_upstream();
    static __thread char buf[1 << 18];
    if (up >= 0) {
        setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct pollfd p[2] = {{.fd = client, .events = POLLIN}, {.fd = up, .events = POLLIN}};
        for (int done = 0; !done && poll(p, 2, -1) > 0;) {
            for (int i = 0; i < 2 && !done; i++) {
                if (!p[i].revents) continue;
                ssize_t n = read(p[i].fd, buf, sizeof buf);
                done = n <= 0 || write_all(p[1 - i].fd, buf, n) != 0;
            }
        }
        close(up);
    }
    close(client);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: relay LISTEN_PORT UPSTREAM_PORT\n");
        return 2;
    }
    upstream_port = atoi(argv[2]);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0 || listen(l, 64) != 0) {
        perror("relay: listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) continue;
        pthread_t t;
        if (pthread_create(&t, NULL, pump, (void *)(long)c) != 0) {
            close(c);
            continue;
        }
        pthread_detach(t);
    }
}
