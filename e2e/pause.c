/* The pod sandbox's process: holds the pod's namespaces until the runtime stops it. */
#include <signal.h>
#include <unistd.h>

static void done(int sig) { (void)sig; _exit(0); }

int main(void) {
    signal(SIGTERM, done);
    signal(SIGINT, done);
    for (;;) pause();
}
