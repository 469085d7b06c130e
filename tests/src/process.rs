//! Child processes that die with the harness instance that started them.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A child process killed on drop; its output goes to a log file kept in the
/// instance's directory, shown when it fails to start.
pub struct Daemon {
    name: String,
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe, and nothing else runs between
        // fork and exec.
        unsafe {
            // A test process killed outright (a timeout, ^C) never runs
            // Drop; the kernel then stops its daemons instead.
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} (is the Debian package installed? see .ci/run)"))?;
        Ok(Self { name: name.to_string(), child, log: log.to_path_buf() })
    }

    /// Waits until `ready` holds, failing early if the process exits.
    pub fn wait_until(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status} while starting:\n{}", self.name, self.log_tail());
            }
            if start.elapsed() > timeout {
                bail!("{} not ready after {timeout:?}:\n{}", self.name, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self) -> String {
        last_lines(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of `text`: where a failing tool says why.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
