//! Waiting for the guest's verdict on its console: [`GuestOutcome`].

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use blkmesh_guest_check::report::{Report, Verdict};

use super::error::GuestError;
use super::vm::{read_lossy, GuestVm};

/// How long QEMU gets to power off after the verdict.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

/// What a finished guest reported.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// The parsed console.
    pub report: Report,
    /// The whole console text.
    pub console: String,
    /// QEMU start to the check program's start (boot).
    pub boot: Option<Duration>,
    /// QEMU start to the verdict.
    pub elapsed: Duration,
    /// QEMU's exit status (after the guest powered off).
    pub exit: Option<ExitStatus>,
}

impl GuestOutcome {
    /// Whether the verdict is PASS.
    pub fn passed(&self) -> bool {
        self.report.verdict == Some(Verdict::Pass)
    }
}

impl GuestVm {
    /// Waits until the guest prints its verdict and powers off. Errors
    /// (with the console tail and QEMU's output) if there is no verdict
    /// within `timeout`, QEMU exits without one, or the guest does not
    /// power off afterwards.
    pub fn wait_verdict(&mut self, timeout: Duration) -> Result<GuestOutcome, GuestError> {
        let deadline = Instant::now() + timeout;
        let verdict_at = loop {
            let text = self.console();
            let report = Report::parse(&text);
            if report.verdict.is_some() {
                break self.started.elapsed();
            }
            if let Some(status) = self.proc.try_wait() {
                // The console may have been completed just before the exit.
                if Report::parse(&self.console()).verdict.is_some() {
                    break self.started.elapsed();
                }
                return Err(GuestError::Exited {
                    status: status.to_string(),
                    console: self.console_tail(),
                    qemu: read_lossy(&self.qemu_log),
                });
            }
            if Instant::now() >= deadline {
                return Err(GuestError::Timeout {
                    timeout,
                    console: self.console_tail(),
                    qemu: read_lossy(&self.qemu_log),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !self.proc.wait_timeout(POWEROFF_GRACE) {
            return Err(GuestError::NoPowerOff(POWEROFF_GRACE));
        }
        let console = self.console();
        let report = Report::parse(&console);
        // The guest's uptime at the check's start, plus the time QEMU took
        // to get the kernel going, is at most the time since QEMU started.
        let boot = report
            .start_uptime_ms
            .map(Duration::from_millis)
            .filter(|b| *b <= verdict_at);
        Ok(GuestOutcome {
            report,
            console,
            boot,
            elapsed: verdict_at,
            exit: self.proc.try_wait(),
        })
    }
}
