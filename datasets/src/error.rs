//! Errors of the dataset readers: each names the file and what was wrong.

use std::path::PathBuf;

/// A dataset could not be read.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DatasetError {
    /// A directory the dataset needs does not exist or is not a directory.
    #[error("{path}: directory not found ({what})")]
    MissingDir {
        /// The directory.
        path: PathBuf,
        /// What was expected there.
        what: String,
    },
    /// A file the dataset needs does not exist.
    #[error("{path}: file not found ({what})")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// What was expected there.
        what: String,
    },
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error (shared, so the error can be cloned across loader threads).
        source: std::sync::Arc<std::io::Error>,
    },
    /// A file's content is not what its format requires.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong, with the expected value.
        message: String,
    },
    /// The dataset's settings are unusable (for example an empty split).
    #[error("{0}")]
    Invalid(String),
}

impl DatasetError {
    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An I/O error for `path`, turning "not found" into [`DatasetError::MissingFile`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error, what: &str) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::MissingFile {
                path,
                what: what.to_string(),
            }
        } else {
            Self::Io {
                path,
                source: std::sync::Arc::new(source),
            }
        }
    }
}

/// Checks that `dir` is an existing directory.
pub fn require_dir(dir: &std::path::Path, what: &str) -> Result<(), DatasetError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(DatasetError::MissingDir {
            path: dir.to_path_buf(),
            what: what.to_string(),
        })
    }
}
