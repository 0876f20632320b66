//! A real server on 127.0.0.1 with a random port, running on its own runtime thread.

use std::sync::Arc;

use clap::Parser;
use exitserve::config::{Args, Settings};
use exitserve::http::serve::serve;
use exitserve::http::shutdown::{self, ShutdownTrigger};
use exitserve::http::{self, AppState};
use exitserve::server::{build_state_with, connection_limits};

/// Served by the same listener code as the binary (connection limits and timeouts included).
pub struct TestServer {
    pub base: String,
    pub state: Arc<AppState>,
    shutdown: Option<ShutdownTrigger>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts the fixture model with extra command-line flags.
    pub fn start(flags: &[&str]) -> Self {
        Self::start_with(flags, |_| {})
    }

    /// Starts the checkpoint in `dir` with extra command-line flags.
    pub fn start_model(dir: &std::path::Path, flags: &[&str]) -> Self {
        let mut argv = vec!["--model", dir.to_str().unwrap()];
        argv.extend_from_slice(flags);
        Self::start_with(&argv, |_| {})
    }

    /// As `start`, adjusting the engine configuration (fault injection).
    pub fn start_with(
        flags: &[&str],
        tune: impl FnOnce(&mut exitserve::engine::EngineConfig),
    ) -> Self {
        let model = super::fixture_dir(super::FIXTURE);
        let mut argv = vec!["exitserve"];
        if !flags.contains(&"--model") {
            argv.extend(["--model", model.to_str().unwrap()]);
        }
        argv.extend_from_slice(flags);
        let settings = Settings::resolve(Args::try_parse_from(argv).unwrap()).unwrap();
        let (trigger, watch) = shutdown::channel();
        let state = build_state_with(&settings, watch.clone(), tune).expect("fixture loads");
        let app = http::router(state.clone());
        let limits = connection_limits(&settings);
        let metrics = state.engine.metrics_handle();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                serve(listener, app, limits, metrics, watch).await;
            });
        });
        Self {
            base,
            state,
            shutdown: Some(trigger),
            thread: Some(thread),
        }
    }

    /// Ends the grace period now: every open response ends with a shutdown error.
    pub fn cut(&self) {
        if let Some(t) = &self.shutdown {
            t.cut();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Value of an unlabelled metric line, e.g. `exitserve_batch_size`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.state.engine.render_metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found"))
    }

    /// The sum of a labelled metric's samples (`name{...} value` lines).
    pub fn metric_sum(&self, name: &str) -> f64 {
        let text = self.state.engine.render_metrics();
        text.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
            .filter_map(|r| r.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl TestServer {
    /// Submits `gen` to the engine directly (validated as a completion would be) and returns
    /// its events unread: a stream nobody reads pauses in the batch and holds its slot.
    pub async fn submit(
        &self,
        gen: exitserve::engine::request::GenerateRequest,
    ) -> exitserve::engine::EventReceiver {
        let engine = &self.state.engine;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let slot = engine.validation_slot(deadline).await.unwrap();
        let valid = engine.validate(gen, deadline, &slot).await.unwrap();
        drop(slot);
        engine.submit(valid, tracing::Span::none()).unwrap()
    }

    /// Takes the one batch slot of a `--max-batch-size 1` server with a stream nobody reads (it
    /// pauses there) of the highest priority, so that nothing that waits preempts it; it holds
    /// the slot until the returned receiver is dropped, however fast the model decodes.
    pub async fn hold_the_one_slot(&self) -> exitserve::engine::EventReceiver {
        let holder = self
            .submit(exitserve::engine::request::GenerateRequest {
                prompts: vec![exitserve::engine::request::PromptInput::Tokens(vec![11])],
                max_tokens: Some(250),
                stream: true,
                ignore_eos: true,
                priority: Some(-1000),
                ..Default::default()
            })
            .await;
        self.wait_for_metric("exitserve_batch_size", 1.0).await;
        holder
    }

    /// Waits (up to 3 s) until metric `name` reads `want`.
    pub async fn wait_for_metric(&self, name: &str, want: f64) {
        for _ in 0..300 {
            if self.metric(name) == want {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{name} = {}, expected {want}", self.metric(name));
    }

    /// Waits (up to 3 s) until the metric `name` is `want` or more.
    pub async fn wait_for_metric_at_least(&self, name: &str, want: f64) {
        for _ in 0..300 {
            if self.metric(name) >= want {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{name} = {}, expected {want} or more", self.metric(name));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(trigger) = self.shutdown.take() {
            trigger.cut();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
