use std::io::IsTerminal;
use std::process::ExitCode;

use exitserve::config::{LogFormat, Settings};
use exitserve::kernels::allocator::HugePageBuffers;

/// Large short-lived buffers on huge pages (see `kernels/allocator.rs`).
#[global_allocator]
static ALLOCATOR: HugePageBuffers = HugePageBuffers;

fn main() -> ExitCode {
    // first: the environment is process-wide, and no thread exists yet
    exitserve::kernels::threads::quiet_candle_pool();
    exitserve::kernels::allocator::keep_large_buffers_off_the_heap();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            say(&format!("exitserve: {e}"));
            return ExitCode::from(1);
        }
    };
    init_tracing(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("exitserve: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(exitserve::server::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("exitserve: {e}"));
            ExitCode::from(1)
        }
    }
}

/// One line to stderr, ignoring a failed write (`eprintln!` would panic).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Logs go to stderr. A failed write (a full disk, a closed stderr) is dropped, never
/// reported: tracing-subscriber's own report is an `eprintln!`, which would panic on the
/// same stderr, on whichever thread logged, the model thread included.
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| LossyStderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// stderr that reports every write as done.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
