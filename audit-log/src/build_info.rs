//! How a build names its source: the package version and the git commit, or a plain statement
//! that the commit is unknown with what to do about it. `build.rs` includes this file to compute
//! `MECHWATCH_BUILD_VERSION` (carried by every signed record) and `MECHWATCH_LONG_VERSION`
//! (`mechwatch --version`); the library compiles it too, so its logic has unit tests.

/// The name of the build-time variable that names the commit of a source without git metadata
/// (a release tarball, a vendored copy): `MECHWATCH_GIT_COMMIT=<hash> cargo build --release`.
pub const COMMIT_VARIABLE: &str = "MECHWATCH_GIT_COMMIT";

/// The version records carry: `0.1.0 (git <hash>)`, or `0.1.0 (commit unknown: built outside
/// git)`.
pub fn build_version(package_version: &str, commit: Option<&str>) -> String {
    match commit {
        Some(c) => format!("{package_version} (git {c})"),
        None => format!("{package_version} (commit unknown: built outside git)"),
    }
}

/// What `mechwatch --version` prints (one line): the build version, and for a build whose
/// commit is unknown, how to build one that names it.
pub fn long_version(package_version: &str, commit: Option<&str>) -> String {
    let v = build_version(package_version, commit);
    match commit {
        Some(_) => v,
        None => format!(
            "{v}; its signed records cannot name the source they came from: build from a git \
             clone, or set {COMMIT_VARIABLE} to the source's commit hash when building"
        ),
    }
}

/// Check a commit hash given in `MECHWATCH_GIT_COMMIT`: 40 (SHA-1) or 64 (SHA-256) hex digits,
/// returned in lowercase.
pub fn commit_from_variable(value: &str) -> Result<String, String> {
    let v = value.trim();
    if matches!(v.len(), 40 | 64) && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(format!(
            "{COMMIT_VARIABLE}={value:?} is not a git commit hash (40 or 64 hex digits); set it \
             to the full hash of the commit the source came from (`git rev-parse HEAD`), or unset it"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn a_build_with_git_metadata_names_its_commit() {
        assert_eq!(
            build_version("0.1.0", Some(HASH)),
            format!("0.1.0 (git {HASH})")
        );
        assert_eq!(
            long_version("0.1.0", Some(HASH)),
            format!("0.1.0 (git {HASH})")
        );
    }

    #[test]
    fn a_build_without_git_metadata_says_so_and_what_to_do() {
        assert_eq!(
            build_version("0.1.0", None),
            "0.1.0 (commit unknown: built outside git)"
        );
        let long = long_version("0.1.0", None);
        assert!(
            long.starts_with("0.1.0 (commit unknown: built outside git); "),
            "{long}"
        );
        assert!(
            long.contains("build from a git clone, or set MECHWATCH_GIT_COMMIT"),
            "{long}"
        );
        assert!(
            !long.contains('\n'),
            "cargo:rustc-env takes one line: {long}"
        );
    }

    #[test]
    fn the_commit_variable_takes_only_a_full_hash() {
        assert_eq!(commit_from_variable(&HASH.to_uppercase()).unwrap(), HASH);
        assert_eq!(commit_from_variable(&format!("{HASH}\n")).unwrap(), HASH);
        let sha256 = "ab".repeat(32);
        assert_eq!(commit_from_variable(&sha256).unwrap(), sha256);
        for bad in ["", "main", "0123456", &format!("{HASH}z"), &HASH[..39]] {
            let e = commit_from_variable(bad).unwrap_err();
            assert!(
                e.contains("is not a git commit hash") && e.contains("git rev-parse HEAD"),
                "{e}"
            );
        }
    }
}
