//! One QMP command to a running guest's QEMU.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::error::GuestError;
use super::vm::GuestVm;

impl GuestVm {
    /// Sends one QMP command (e.g. `system_reset`, `quit`) and returns the
    /// response line. `arguments` is a JSON object or empty.
    pub fn qmp(&self, command: &str, arguments: &str) -> Result<String, GuestError> {
        let err = |message: String| GuestError::Qmp {
            command: command.to_string(),
            message,
        };
        let stream = UnixStream::connect(&self.qmp)
            .map_err(|e| err(format!("connect {}: {e}", self.qmp.display())))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| err(e.to_string()))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| err(e.to_string()))?);
        let mut w = stream;
        let mut line = String::new();
        let mut next_reply = |reader: &mut BufReader<UnixStream>| -> Result<String, GuestError> {
            loop {
                line.clear();
                let n = reader
                    .read_line(&mut line)
                    .map_err(|e| err(format!("read: {e}")))?;
                if n == 0 {
                    return Err(err("QEMU closed the connection".into()));
                }
                // Skip asynchronous events.
                if line.contains("\"return\"") || line.contains("\"error\"") {
                    return Ok(line.trim().to_string());
                }
            }
        };
        // The greeting, then capabilities negotiation.
        let mut greeting = String::new();
        reader
            .read_line(&mut greeting)
            .map_err(|e| err(format!("read greeting: {e}")))?;
        writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#).map_err(|e| err(e.to_string()))?;
        next_reply(&mut reader)?;
        let args = if arguments.trim().is_empty() {
            String::new()
        } else {
            format!(r#","arguments":{arguments}"#)
        };
        writeln!(w, r#"{{"execute":"{command}"{args}}}"#).map_err(|e| err(e.to_string()))?;
        let reply = next_reply(&mut reader)?;
        if reply.contains("\"error\"") {
            return Err(err(reply));
        }
        Ok(reply)
    }
}
