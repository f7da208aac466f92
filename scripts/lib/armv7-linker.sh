#!/bin/sh
# The linker of armv7-unknown-linux-gnueabihf (.cargo/config.toml): the cross
# gcc driving gold instead of bfd. binutils 2.40's ld.bfd writes the IRELATIVE
# GOT entries of static glibc's memcpy/memchr resolvers without the Thumb bit
# when it links the (25 MB of text) agent, and the agent then dies with
# SIGSEGV in memcpy_ifunc before its first system call; a hello-world links
# fine with bfd. gold gets the entries right (docs/cross.md).
exec arm-linux-gnueabihf-gcc -fuse-ld=gold "$@"
