use tracing_subscriber::{EnvFilter, fmt};

use crate::{LogConfig, LogFormat};

/// Installs the global subscriber: `RUST_LOG` if set, else the configured filter; pretty
/// or JSON lines. A second call is a no-op.
pub fn init_tracing(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.filter));
    let builder = fmt().with_env_filter(filter).with_target(false);
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
