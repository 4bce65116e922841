//! Policy errors: each names the file and, where it can, the line and column.

use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based line and column in a policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub line: usize,
    pub col: usize,
}

impl Loc {
    /// The line and column of byte `offset` in `text`.
    pub fn of(text: &str, offset: usize) -> Self {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Self { line, col }
    }
}

/// A policy that cannot be used as written (or against this model), with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub path: PathBuf,
    pub at: Option<Loc>,
    pub message: String,
}

impl PolicyError {
    pub fn at(path: &Path, at: Option<Loc>, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            at,
            message: message.into(),
        }
    }

    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Self::at(path, None, format!("cannot read: {e}"))
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some(Loc { line, col }) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

/// Several policy errors, shown one per line.
#[derive(Debug, Clone)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based() {
        let t = "ab\ncd\n";
        assert_eq!(Loc::of(t, 0), Loc { line: 1, col: 1 });
        assert_eq!(Loc::of(t, 4), Loc { line: 2, col: 2 });
        assert_eq!(Loc::of(t, 99), Loc { line: 3, col: 1 });
    }
}
