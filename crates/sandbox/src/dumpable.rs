//! Keeping other processes of the same user out of this one.

use crate::SandboxError;

/// Marks this process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`).
///
/// Every blkmesh daemon calls it first thing in `main`. A non-dumpable
/// process leaves no core dump (guest memory, tokens), and the kernel makes
/// its `/proc/<pid>/` files (`fd/`, `mem`, `environ`, `maps`, …) owned by
/// root and refuses `ptrace` and `process_vm_readv` to anyone without
/// `CAP_SYS_PTRACE`, even to a process of the same uid. So a compromised
/// worker cannot reach the frontend's descriptors (other tenants' guest
/// memory memfds) or memory through `/proc`, whatever uid it shares.
///
/// It stays set across `setuid` (which clears it anyway) but not across
/// `execve` of a readable binary; blkmesh daemons exec nothing.
pub fn set_not_dumpable() -> Result<(), SandboxError> {
    nix::sys::prctl::set_dumpable(false).map_err(|source| SandboxError::Privileges {
        user: String::new(),
        op: "prctl(PR_SET_DUMPABLE, 0)",
        source,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn leaves_the_process_not_dumpable() {
        // Tests share the process; setting it again is harmless.
        super::set_not_dumpable().unwrap();
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
    }
}
