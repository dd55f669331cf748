/* Injection target: blocked in read(2) on a pipe (stdin), the classic -ERESTARTSYS case. It
 * verifies the tester's counter stream byte for byte; a read that fails with EINTR is counted. */
#include "common.c"

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    ready("tids=%d", (int)getpid());
    struct stream s = {0};
    while (stream_read(&s))
        ;
    return report(s.eintr, stream_failures(&s), "reads=%llu words=%llu",
                  (unsigned long long)s.reads, (unsigned long long)s.next);
}
