/* Load generator for tests/kernel/test_lineage_load.py: short-lived processes at a target rate.
 *
 *   spawner RATE SECONDS EVERY WORKERS
 *       WORKERS processes fork+exec RATE processes/s in total for SECONDS; every EVERY-th child
 *       runs "spawner connect PORT" (connects to the listener, then exits), the others
 *       "spawner exit". Prints "PORT n" first, then one "DONE spawned connects elapsed_ms" per
 *       worker.
 *   spawner connect PORT      one TCP connect to 127.0.0.1:PORT, then exit.
 *   spawner exit              exit at once.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int do_connect(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof(a)) != 0)
        return 1;
    write(s, "x", 1);
    close(s);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "exit") == 0)
        return 0;
    if (argc == 3 && strcmp(argv[1], "connect") == 0)
        return do_connect(atoi(argv[2]));
    if (argc != 5)
        return 2;
    long rate = atol(argv[1]), secs = atol(argv[2]), every = atol(argv[3]), workers = atol(argv[4]);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof(a);
    if (bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 4096) || getsockname(ls, (struct sockaddr *)&a, &al))
        return 3;
    char port[16];
    snprintf(port, sizeof(port), "%d", ntohs(a.sin_port));
    printf("PORT %s\n", port);
    fflush(stdout);
    for (long w = 1; w < workers; w++) { /* the listener is shared: every worker accepts */
        if (fork() == 0)
            break;
    }
    rate /= workers > 0 ? workers : 1;
    long long start = now_ns(), end = start + secs * 1000000000LL;
    long spawned = 0, connects = 0;
    /* Arguments on the heap, as a shell or Python builds them: pages a forked child has mapped.
     * (A string literal in a page the child never touched cannot be read by BPF: docs/agents.md.) */
    char *true_argv[] = {argv[0], strdup("exit"), NULL};
    char *conn_argv[] = {argv[0], strdup("connect"), strdup(port), NULL};
    char *envp[] = {NULL};
    while (now_ns() < end) {
        long due = (long)((now_ns() - start) * rate / 1000000000LL);
        while (spawned < due) {
            int conn = every > 0 && spawned % every == 0;
            pid_t p = fork();
            if (p == 0) {
                if (conn)
                    execve(argv[0], conn_argv, envp);
                else
                    execve(argv[0], true_argv, envp);
                _exit(127);
            }
            if (p < 0)
                break;
            spawned++;
            connects += conn;
        }
        for (;;) { /* accept and close what arrived */
            int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
            if (c < 0)
                break;
            close(c);
        }
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        usleep(200);
    }
    long long t_end = now_ns();
    while (waitpid(-1, NULL, 0) > 0) { /* the last children */
        int c;
        while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0)
            close(c);
    }
    int c;
    while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0)
        close(c);
    printf("DONE %ld %ld %lld\n", spawned, connects, (t_end - start) / 1000000);
    fflush(stdout);
    return 0;
}
