//! Child processes that a test or the bench starts, never left running: a [`ChildGuard`] stops its
//! process on drop (SIGTERM, up to 10 s to exit, then SIGKILL), also when the test panics, and
//! collects its stdout and stderr as they come so that neither pipe ever fills up.

use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// How long a process gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// A pipe read into a buffer by a thread of its own.
#[derive(Debug)]
struct Captured {
    buf: Arc<Mutex<Vec<u8>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Captured {
    fn new(mut pipe: impl Read + Send + 'static) -> Captured {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let reader = thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("capture lock")
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Captured {
            buf,
            reader: Some(reader),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.buf.lock().expect("capture lock").clone()
    }

    /// Everything, for a writer that has exited: waits (up to 2 s, in case something it started
    /// still holds the pipe) for the reader to reach the end.
    fn drained(&self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.reader.as_ref().is_some_and(|r| !r.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        self.bytes()
    }

    /// Everything, once the writer closed the pipe.
    fn finish(mut self) -> Vec<u8> {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.bytes()
    }
}

/// A running child process: stopped on drop, its stdout and stderr collected.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    status: Option<ExitStatus>,
    stdout: Option<Captured>,
    stderr: Option<Captured>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr piped (and collected); panics when it cannot start.
    ///
    /// An executable the test has just written (a copy of the probe) can fail to start with
    /// `ETXTBSY` for a moment: a child another test thread forked meanwhile still holds the
    /// written file's descriptor until it execs. That is retried, for up to a second.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("spawning {cmd:?}: {e}"),
            }
        };
        let stdout = child.stdout.take().map(Captured::new);
        let stderr = child.stderr.take().map(Captured::new);
        ChildGuard {
            child,
            status: None,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the process (nothing once it has been reaped).
    pub fn signal(&mut self, sig: i32) {
        if self.exited().is_none() {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waiting for a child");
        }
        self.status
    }

    /// Waits for it to exit, however long that takes.
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        let st = self.child.wait().expect("waiting for a child");
        self.status = Some(st);
        st
    }

    /// Waits up to `timeout` (times [`crate::timeout_scale`]) for it to exit; panics naming
    /// `what` when it does not.
    pub fn wait_within(&mut self, what: &str, timeout: Duration) -> ExitStatus {
        let timeout = timeout * crate::timeout_scale();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still running after {timeout:?}; stderr: {}",
                self.stderr_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to 10 s to exit, then SIGKILL; reaps it. Does nothing once it has exited.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + GRACE;
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                return self.wait();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait()
    }

    /// What it has written to stdout so far.
    pub fn stdout(&self) -> Vec<u8> {
        self.stdout
            .as_ref()
            .map(Captured::bytes)
            .unwrap_or_default()
    }

    /// The lines it has written to stdout so far, without one it is still writing.
    pub fn stdout_lines(&self) -> Vec<String> {
        let out = self.stdout();
        let complete = out.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        String::from_utf8_lossy(&out[..complete])
            .lines()
            .map(String::from)
            .collect()
    }

    /// What it has written to stderr so far, as text; once it has exited (as last seen), all of
    /// it: the reader may still be catching up with the last lines.
    pub fn stderr_text(&self) -> String {
        let read: fn(&Captured) -> Vec<u8> = if self.status.is_some() {
            Captured::drained
        } else {
            Captured::bytes
        };
        let bytes = self.stderr.as_ref().map(read).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits for it to exit, however long that takes, and for its pipes to close; returns its
    /// status and everything it wrote.
    pub fn output(mut self) -> Output {
        let status = self.wait();
        Output {
            status,
            stdout: self.stdout.take().map(Captured::finish).unwrap_or_default(),
            stderr: self.stderr.take().map(Captured::finish).unwrap_or_default(),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A failed assertion must not leave the process running.
        self.terminate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_collected_and_a_partial_line_left_out() {
        let mut p = ChildGuard::spawn(
            Command::new("sh").args(["-c", "printf 'one\\ntwo\\nthr'; echo oops >&2; sleep 30"]),
        );
        crate::wait_for("the output", Duration::from_secs(10), || {
            p.stdout().len() == 11 && p.stderr_text() == "oops\n"
        });
        assert_eq!(p.stdout_lines(), ["one", "two"]);
        assert!(p.exited().is_none());
        let st = p.terminate();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGTERM)
        );
    }
}
