//! A kernel client on top of `lunmpio target`: nbdfuse exposes the export as a file, a loop device turns
//! it into a block device, and ext4 is created, mounted, written, unmounted and checked clean.
//!
//! Every step that changes system state has a guard that undoes it on drop, in reverse order, so a
//! failing assertion leaves no mount, loop device or FUSE mount behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Unmounts a FUSE mount point on drop (the nbdfuse process then exits on its own).
struct FuseMount {
    dir: PathBuf,
    nbdfuse: Option<ProcessGuard>,
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = run(
            tool("fusermount3").arg("-u").arg(&self.dir),
            Duration::from_secs(20),
        );
        if let Some(mut p) = self.nbdfuse.take() {
            // nbdfuse exits once unmounted; the guard kills it by PID if it does not.
            p.wait_timeout(Duration::from_secs(10));
        }
    }
}

/// Detaches a loop device on drop.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run(
            tool("losetup").args(["-d", &self.0]),
            Duration::from_secs(20),
        );
    }
}

/// Unmounts a file system on drop; lazily if a plain unmount fails.
struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn unmount(&mut self) {
        run_ok(tool("umount").arg(&self.dir));
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let out = run(tool("umount").arg(&self.dir), Duration::from_secs(20));
            if !out.status.success() {
                let _ = run(
                    tool("umount").arg("-l").arg(&self.dir),
                    Duration::from_secs(20),
                );
            }
        }
    }
}

fn mount_nbdfuse(dir: &Path, uri: &str) -> FuseMount {
    let pidfile = dir.with_extension("pid");
    let process = ProcessGuard::spawn(
        "nbdfuse",
        tool("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg(uri),
    );
    let mut mount = FuseMount {
        dir: dir.to_path_buf(),
        nbdfuse: Some(process),
    };
    // nbdfuse writes its pid file once it serves the mount point.
    let ready = wait_until(Duration::from_secs(20), || {
        pidfile.exists() || !mount.nbdfuse.as_mut().unwrap().is_running()
    });
    let running = mount.nbdfuse.as_mut().unwrap().is_running();
    if !(ready && running) {
        let (out, err) = mount.nbdfuse.as_ref().unwrap().output_so_far();
        panic!("nbdfuse did not come up (ready {ready}, running {running}):\n{out}\n{err}");
    }
    mount
}

#[test]
fn ext4_on_a_loop_device_on_nbdfuse() {
    for (t, p) in [
        ("nbdfuse", "nbdfuse"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("fsck.ext4", "e2fsprogs"),
    ] {
        require_tool(t, p);
    }
    let target = TargetSpec::memory("128MiB", 2).spawn();
    let dir = tempdir();
    let fuse_dir = dir.path().join("fuse");
    let fs_dir = dir.path().join("fs");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&fs_dir).unwrap();

    let fuse = mount_nbdfuse(&fuse_dir, target.uri(0));
    let disk = fuse_dir.join("disk");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 128 << 20);

    let out = run_ok(tool("losetup").args(["-f", "--show"]).arg(&disk));
    let device = LoopDevice(stdout_text(&out).trim().to_string());
    assert!(
        device.0.starts_with("/dev/loop"),
        "losetup printed {:?}",
        device.0
    );

    run_ok(tool("mkfs.ext4").args(["-q", &device.0]));
    run_ok(tool("mount").arg(&device.0).arg(&fs_dir));
    let mut mounted = Mounted {
        dir: fs_dir.clone(),
        mounted: true,
    };
    let payload = pseudo_random(3 << 20, 99);
    std::fs::write(fs_dir.join("hello.bin"), &payload).unwrap();
    run_ok(Command::new("sync").arg("-f").arg(fs_dir.join("hello.bin")));
    assert_eq!(std::fs::read(fs_dir.join("hello.bin")).unwrap(), payload);
    mounted.unmount();

    let out = run(tool("fsck.ext4").args(["-fn", &device.0]), TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "fsck.ext4 found problems ({}):\n{}{}",
        out.status,
        stdout_text(&out),
        stderr_text(&out)
    );

    // The file system went over the wire: the target counted the writes.
    assert!(target.counter(0, "bytesWritten") >= 3 << 20);

    drop(mounted);
    drop(device);
    drop(fuse);
}
