/* A loopback connection-churn load in C, for measuring a consumer beyond what Python clients
 * reach (bench/sustained.py --c-load). Same connection as bench/churn.py's ping(): connect, 8
 * bytes each way, close. The server (epoll, one thread) and the clients (N threads) run in this
 * one process; it listens on 127.0.0.1 only.
 *
 *     cc -O2 -pthread -o churn bench/churn.c && ./churn N_CLIENTS MAX_SECONDS
 *
 * Prints "PORT <port>" once listening. Then reads commands on stdin, one per line:
 *     rate R    connections/s in all (paced; 0 = as fast as possible)
 *     count     prints "COUNT <completed connections so far>"
 * and exits at EOF, "quit", or after MAX_SECONDS (bounded: it never outlives its caller long). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static _Atomic double rate;          /* connections/s in all; <= 0: flat out */
static atomic_long done;             /* completed connections */
static atomic_int stop;
static int nclients, port;
static double deadline;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *serve(void *arg)
{
    int srv = *(int *)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = srv}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, srv, &ev);
    char buf[64];
    while (!atomic_load(&stop)) {
        int n = epoll_wait(ep, evs, 256, 200);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == srv) {
                int c;
                while ((c = accept4(srv, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            if (recv(fd, buf, sizeof buf, 0) > 0)
                (void)!send(fd, "pong1234", 8, MSG_NOSIGNAL);
            epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            close(fd);
        }
    }
    return NULL;
}

static int ping(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int s = socket(AF_INET, SOCK_STREAM, 0), ok = 0;
    char buf[8];
    if (s < 0)
        return 0;
    struct timeval tv = {.tv_sec = 5};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0 && send(s, "ping1234", 8, MSG_NOSIGNAL) == 8)
        ok = recv(s, buf, sizeof buf, 0) > 0;
    close(s);
    return ok;
}

static void *client(void *arg)
{
    (void)arg;
    double next = now();
    while (!atomic_load(&stop)) {
        double t = now(), r = atomic_load(&rate);
        if (t >= deadline)
            break;
        if (r > 0) {
            if (next > t) {
                double d = next - t < 0.2 ? next - t : 0.2;
                struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
                nanosleep(&ts, NULL);
                continue;
            }
            next += nclients / r;
            if (next < t - 1.0)
                next = t - 1.0;  /* behind by > 1 s: do not burst to catch up */
        }
        if (ping())
            atomic_fetch_add(&done, 1);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s N_CLIENTS MAX_SECONDS\n", argv[0]);
        return 2;
    }
    nclients = atoi(argv[1]);
    if (nclients < 1 || nclients > 64) {
        fprintf(stderr, "N_CLIENTS: 1..64\n");
        return 2;
    }
    deadline = now() + atof(argv[2]);
    int srv = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(srv, (struct sockaddr *)&a, sizeof a) || listen(srv, 4096) ||
        getsockname(srv, (struct sockaddr *)&a, &len)) {
        perror("listen");
        return 1;
    }
    port = ntohs(a.sin_port);
    atomic_store(&rate, 100.0);
    pthread_t st, ct[64];
    pthread_create(&st, NULL, serve, &srv);
    for (int i = 0; i < nclients; i++)
        pthread_create(&ct[i], NULL, client, NULL);
    printf("PORT %d\n", port);
    fflush(stdout);
    char line[128];
    while (now() < deadline && fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "rate ", 5)) {
            atomic_store(&rate, atof(line + 5));
        } else if (!strncmp(line, "count", 5)) {
            printf("COUNT %ld\n", atomic_load(&done));
            fflush(stdout);
        } else if (!strncmp(line, "quit", 4)) {
            break;
        }
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < nclients; i++)
        pthread_join(ct[i], NULL);
    pthread_join(st, NULL);
    return 0;
}
