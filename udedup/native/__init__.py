"""The native boundary: the cffi builder (:mod:`.build`); :mod:`.lib`, the only module that imports
the compiled extension ``udedup._native`` (ABI check, buffer checks, status codes and errno ->
exceptions); the wrappers on top of it: :mod:`.kernels` (page kernels), :mod:`.syscalls`
(process_vm_readv, prctl) and :mod:`.ptrace` (syscall injection). Everything above calls C through
here."""
