//! Llama-family base models: configuration, checkpoint loading, tokenizer and the forward pass.

pub mod config;
pub mod llama;
pub mod loader;
pub mod tokenizer;

use std::path::PathBuf;

use crate::backend::BackendError;

/// Why a base model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    /// The backend refused or failed an upload (no device memory, a kernel error): not a fault
    /// of the checkpoint's files.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
}

impl ModelError {
    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelError::Io { .. } => "io",
            ModelError::Config { .. } => "config",
            ModelError::Weights { .. } => "weights",
            ModelError::Tokenizer { .. } => "tokenizer",
            ModelError::Backend(_) => "backend",
        }
    }
}
