//! Finding the workspace binaries the harness starts.

use std::path::PathBuf;

/// Environment variable naming the directory of the blkmesh binaries.
pub const BIN_DIR_ENV: &str = "BLKMESH_BIN_DIR";

/// The directory holding the workspace binaries: `$BLKMESH_BIN_DIR` if set,
/// else the directory of the running executable, or its parent when that is
/// a `deps/` directory (where cargo puts test binaries).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("blkmesh-testkit: cannot locate the current executable: {e}"));
    bin_dir_from_exe(&exe)
}

/// The bin directory for an executable at `exe` (see [`bin_dir`]).
fn bin_dir_from_exe(exe: &std::path::Path) -> PathBuf {
    let mut dir = exe
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of the workspace binary `name` (e.g. `"blkmesh-manager"`).
///
/// # Panics
///
/// If the binary does not exist: build the binaries first
/// (`cargo build --bins`) or point `$BLKMESH_BIN_DIR` at them.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "blkmesh-testkit: binary {name:?} not found at {}; build the binaries first: \
             cargo build --bins (or set {BIN_DIR_ENV} to their directory)",
            path.display()
        );
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn bin_dir_skips_cargo_deps_directory() {
        assert_eq!(
            bin_dir_from_exe(Path::new("/ws/target/debug/deps/cluster_smoke-1234")),
            Path::new("/ws/target/debug")
        );
    }

    #[test]
    fn bin_dir_keeps_plain_directory() {
        assert_eq!(
            bin_dir_from_exe(Path::new("/ws/target/debug/blkmesh")),
            Path::new("/ws/target/debug")
        );
    }

    #[test]
    #[should_panic(expected = "build the binaries first")]
    fn bin_path_panics_with_hint_for_missing_binary() {
        bin_path("blkmesh-no-such-binary");
    }
}
