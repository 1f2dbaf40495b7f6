# Guest test for tests/test_kernel.py: multi-connection (nbd-client -C N) against nbdtrack.
#
# Phase 1 connects with $NBD_CLIENT_OPTS (e.g. "-C 2") and pins O_DIRECT I/O to each CPU.
# blk-mq gives every connection its own hardware queue and maps CPU k to queue k, so with
# SMP >= 2 the requests of CPU 0 travel on the first socket and those of CPU 1 on the
# second. Data written through one connection is read back through the other, which is
# what NBD_FLAG_CAN_MULTI_CONN promises. It reports "RESULT multiconn ...".
# Phase 2 runs the harness smoke test (passed as /harness/files/smoke.sh) with the same
# options: mkfs.ext4, files, remount after dropping caches, e2fsck, disconnect.
set -e
DEV=${NBD_DEV:-/dev/nbd0}
MC_MB=${MC_MB:-4}
NCPU=$(nproc)
[ "$NCPU" -ge 2 ] || fail "multiconn needs SMP>=2 (guest has $NCPU cpu)"
[ -f /harness/files/smoke.sh ] || fail "smoke.sh was not passed to the guest"

step "multi-conn: connect opts='${NBD_CLIENT_OPTS:-}'"
nbd_connect "$DEV" ${NBD_CLIENT_OPTS:-} || fail "nbd-client connect failed"

# cpu 0 writes region A, cpu 1 writes region B (distinct random data)
dd if=/dev/urandom of=/tmp/a bs=1M count="$MC_MB" 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=1M count="$MC_MB" 2>/dev/null
HA=$(sha256sum /tmp/a | cut -d' ' -f1)
HB=$(sha256sum /tmp/b | cut -d' ' -f1)
# conv=fsync ends each write with fsync(), which the kernel turns into NBD_CMD_FLUSH on
# the same cpu's socket (busybox "blockdev --flushbufs" would send no FLUSH at all)
taskset 1 $GDD if=/tmp/a of="$DEV" bs=64k oflag=direct conv=notrunc,fsync 2>/dev/null \
    || fail "write A on cpu 0"
taskset 2 $GDD if=/tmp/b of="$DEV" bs=1M seek="$MC_MB" oflag=direct conv=notrunc,fsync \
    2>/dev/null || fail "write B on cpu 1"

# read each region back on the other cpu, i.e. through the other connection
RA=$(taskset 2 $GDD if="$DEV" bs=64k count=$((MC_MB * 16)) iflag=direct 2>/dev/null \
    | sha256sum | cut -d' ' -f1)
RB=$(taskset 1 $GDD if="$DEV" bs=1M skip="$MC_MB" count="$MC_MB" iflag=direct 2>/dev/null \
    | sha256sum | cut -d' ' -f1)
[ "$HA" = "$RA" ] || fail "region A written on cpu 0, read on cpu 1: $HA != $RA"
[ "$HB" = "$RB" ] || fail "region B written on cpu 1, read on cpu 0: $HB != $RB"
rm -f /tmp/a /tmp/b
nbd_disconnect "$DEV" || fail "nbd-client -d"
sleep 1
result "multiconn ok cpus=$NCPU mb=$MC_MB sha_a=$HA sha_b=$HB size_after=$(nbd_size "$DEV")"

. /harness/files/smoke.sh
