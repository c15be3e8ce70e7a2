//! A kernel client on top of `lunmpio target`: nbdfuse exposes the export as a file, a loop device turns
//! it into a block device, and ext4 is created, mounted, written, unmounted and checked clean
//! (`lunmpio_testkit::ext4_on_nbdfuse`, shared with the daemon's suite).

use lunmpio_testkit::*;

#[test]
fn ext4_on_a_loop_device_on_nbdfuse() {
    let target = TargetSpec::memory("128MiB", 2).spawn();
    ext4_on_nbdfuse(target.uri(0), 128 << 20);
    // The file system went over the wire: the target counted the writes.
    assert!(target.counter(0, "bytesWritten") >= 3 << 20);
}
