//! Running a path's `fence` program (docs/GUARANTEES.md G3).
//!
//! NBD has no reservations: closing our end of a connection cannot stop a stalled target from executing
//! what it already holds. A fence is the operator's way to make that impossible — kill the target
//! process, stop an export over QMP, drop the initiator's traffic, call an array's API — and its exit
//! status 0 is the evidence that releases the path's in-doubt writes at once (`crate::in_doubt`).
//!
//! The program runs without a shell, with `LUNMPIO_LUN`, `LUNMPIO_PATH`, `LUNMPIO_PATH_ID` and
//! `LUNMPIO_PATH_URI` in its environment, stdin closed, bounded by `fence_timeout` (then killed). A
//! failure is never taken as success: the writes stay held as without a fence.

use std::process::Stdio;
use std::time::{Duration, Instant};

/// Bytes of a fence's output kept for the event that reports a failure.
const OUTPUT_BYTES_MAX: usize = 4096;

/// How a fence run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded { took: Duration },
    Failed { reason: String, took: Duration },
}

/// Who is being fenced (the program's environment).
pub(crate) struct Subject<'a> {
    pub(crate) lun: &'a str,
    pub(crate) path: &'a str,
    pub(crate) path_id: u64,
    pub(crate) uri: &'a str,
}

/// `kill -9 1234`, for events.
pub(crate) fn describe(command: &[String]) -> String {
    command.join(" ")
}

/// Runs `command` to completion within `timeout`.
pub(crate) async fn run(command: &[String], subject: Subject<'_>, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let failed = |reason: String| Outcome::Failed {
        reason,
        took: started.elapsed(),
    };
    let Some((program, args)) = command.split_first() else {
        return failed("the fence command is empty".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("LUNMPIO_LUN", subject.lun)
        .env("LUNMPIO_PATH", subject.path)
        .env("LUNMPIO_PATH_ID", format!("{:#018x}", subject.path_id))
        .env("LUNMPIO_PATH_URI", subject.uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot run `{program}`: {e}")),
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => failed(format!(
            "did not exit within fence_timeout ({} ms); killed",
            timeout.as_millis()
        )),
        Ok(Err(e)) => failed(format!("waiting for it failed: {e}")),
        Ok(Ok(output)) if output.status.success() => Outcome::Succeeded {
            took: started.elapsed(),
        },
        Ok(Ok(output)) => {
            let said = last_line(&output.stderr)
                .or_else(|| last_line(&output.stdout))
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            failed(format!("{}{said}", output.status))
        }
    }
}

/// The last non-empty line of a program's output, bounded.
fn last_line(bytes: &[u8]) -> Option<String> {
    let tail = &bytes[bytes.len().saturating_sub(OUTPUT_BYTES_MAX)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject<'static> {
        Subject {
            lun: "lun0",
            path: "p0",
            path_id: 0xab,
            uri: "nbd://127.0.0.1/x",
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn exit_zero_is_success_and_the_environment_names_the_path() {
        let out = run(
            &sh(r#"test "$LUNMPIO_LUN/$LUNMPIO_PATH/$LUNMPIO_PATH_ID/$LUNMPIO_PATH_URI" = "lun0/p0/0x00000000000000ab/nbd://127.0.0.1/x""#),
            subject(),
            Duration::from_secs(10),
        )
        .await;
        assert!(matches!(out, Outcome::Succeeded { .. }), "{out:?}");
    }

    #[tokio::test]
    async fn failures_say_why() {
        let out = run(
            &sh("echo nope >&2; exit 3"),
            subject(),
            Duration::from_secs(10),
        )
        .await;
        match out {
            Outcome::Failed { reason, .. } => {
                assert!(reason.contains("3") && reason.contains("nope"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let out = run(
            &["/nonexistent/fence".to_string()],
            subject(),
            Duration::from_secs(10),
        )
        .await;
        assert!(
            matches!(&out, Outcome::Failed { reason, .. } if reason.contains("cannot run")),
            "{out:?}"
        );
        let out = run(&[], subject(), Duration::from_secs(10)).await;
        assert!(matches!(out, Outcome::Failed { .. }));
    }

    #[tokio::test]
    async fn a_fence_that_hangs_is_killed_at_its_timeout() {
        let out = run(&sh("exec sleep 30"), subject(), Duration::from_millis(200)).await;
        match out {
            Outcome::Failed { reason, took } => {
                assert!(reason.contains("fence_timeout"), "{reason}");
                assert!(took < Duration::from_secs(10));
            }
            other => panic!("{other:?}"),
        }
    }
}
