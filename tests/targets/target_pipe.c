/* Injection target: blocked in read(2) on a pipe (stdin), the classic -ERESTARTSYS case. It
 * verifies the tester's counter stream byte for byte; a read that fails with EINTR is counted. */
#include "common.c"

int main(int argc, char **argv)
{
    dup_alloc(argc, argv);
    ready("tids=%d", (int)getpid());
    struct stream s = {0};
    uint8_t buf[4096];
    uint64_t reads = 0, eintr = 0, errors = 0;
    for (;;) {
        ssize_t n = read(0, buf, sizeof(buf));
        if (n > 0) {
            reads++;
            stream_feed(&s, buf, (size_t)n);
        } else if (n == 0) {
            break;
        } else if (errno == EINTR) {
            eintr++;
        } else {
            errors++;
            break;
        }
    }
    return report(eintr, s.bad + errors + (s.have != 0), "reads=%llu words=%llu",
                  (unsigned long long)reads, (unsigned long long)s.next);
}
