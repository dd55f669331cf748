/* Declarations read by cffi's cdef (udedup/_build.py). No preprocessor logic here: the real
 * header udedup.h includes this file, so the C compiler checks these against the definitions. */

#define UD_ABI_VERSION 4

#define UD_ISA_PORTABLE 0
#define UD_ISA_SSE42 1
#define UD_ISA_AVX2 2
#define UD_ISA_AVX512 3

/* ud_crc32c_select_hw modes (ud_crc32c_hw_active returns the one in use): the table CRC, the
 * fastest hardware CRC, the crc32 instruction only */
#define UD_CRC_OFF 0
#define UD_CRC_BEST 1
#define UD_CRC_INSN 2

/* ud_crc32c_kind: what the page kernels' CRC runs on (VPCLMUL256: crc32c_pages folds 256 bits at a
 * time, the fused scan interleaves the crc32 instruction with the vector hash) */
#define UD_CRC_KIND_SW 0
#define UD_CRC_KIND_INSN 1
#define UD_CRC_KIND_VPCLMUL256 2
#define UD_CRC_KIND_VPCLMUL512 3

/* Build and dispatch */
int ud_abi_version(void);
int ud_isa_supported(void);
int ud_isa_active(void);
int ud_isa_select(int level);
int ud_crc32c_hw_supported(void);
int ud_crc32c_hw_active(void);
int ud_crc32c_select_hw(int mode);
int ud_crc32c_kind(void);

/* Page kernels: buf holds npages contiguous pages of page_size bytes (a multiple of 64). */
uint32_t ud_crc32c(uint32_t crc, const void *buf, size_t len);
void ud_crc32c_pages(const void *buf, size_t page_size, size_t npages, uint32_t *out);
void ud_hash64_pages(const void *buf, size_t page_size, size_t npages, uint64_t *out);
size_t ud_zero_pages(const void *buf, size_t page_size, size_t npages, uint8_t *out);
size_t ud_scan_pages(const void *buf, size_t page_size, size_t npages,
                     uint32_t *crc, uint64_t *hash, uint8_t *zero);
int ud_compare_pages(const void *a, size_t a_pages, const void *b, size_t b_pages,
                     size_t page_size, const int64_t *ia, const int64_t *ib, size_t npairs,
                     uint8_t *equal);
uint64_t ud_sum64(const void *buf, size_t len);

/* Syscalls: return -1 and store errno in *err on failure. */
int64_t ud_remote_readv(int pid, const uint64_t *addrs, const uint64_t *lens, size_t n,
                        void *local, size_t local_len, int *err);
int ud_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4,
             unsigned long a5, int *err);
