/*
 * The sandbox process of a test pod (what Kubernetes calls "pause"): it holds the
 * pod's namespaces and does nothing else. Built with `gcc -static` so that its image
 * needs no libraries. SIGINT and SIGTERM end it with status 0, as the sandbox stops;
 * children reparented to it (it is the pod's pid 1 when pid namespaces are shared)
 * are reaped so that none stays a zombie.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signo) {
    (void)signo;
    _exit(0);
}

static void reap(int signo) {
    (void)signo;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction on_stop = {.sa_handler = stop};
    struct sigaction on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};

    if (sigaction(SIGINT, &on_stop, NULL) || sigaction(SIGTERM, &on_stop, NULL)
        || sigaction(SIGCHLD, &on_child, NULL)) {
        return 1;
    }
    for (;;) {
        pause();
    }
}
