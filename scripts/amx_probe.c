/* Does this machine run AMX tile instructions? Exit 0 if so.

   Some virtual machines advertise AMX in CPUID but fault on its first tile instruction
   (SIGILL or a general protection fault). A native build of llama.cpp then compiles its
   AMX kernels in, and llama-server crashes at its first matrix multiplication.
   build_llama_server.py runs this before configuring, to leave AMX out there. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int main(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        return 2; /* the kernel does not let this process use tile data */
    }
    uint8_t config[64];
    memset(config, 0, sizeof config);
    config[0] = 1;   /* palette 1 */
    config[16] = 64; /* tile 0: 64 bytes per row */
    config[48] = 16; /* tile 0: 16 rows */
    _tile_loadconfig(config);
    _tile_zero(0);
    _tile_release();
    return 0;
}
