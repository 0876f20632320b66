//! The two moments of a graceful shutdown, as seen by connections and handlers:
//! *draining* (the first signal: stop accepting, close idle connections, refuse bodies still
//! being sent) and *cut* (the grace period is over: every open response ends now, a stream
//! with an error event and `[DONE]`).

use tokio::sync::watch;

/// Held by whoever decides (the server's run loop, or a test).
pub struct ShutdownTrigger {
    drain: watch::Sender<bool>,
    cut: watch::Sender<bool>,
}

/// Cloned into every connection and request.
#[derive(Clone)]
pub struct Shutdown {
    drain: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (drain_tx, drain) = watch::channel(false);
    let (cut_tx, cut) = watch::channel(false);
    (
        ShutdownTrigger {
            drain: drain_tx,
            cut: cut_tx,
        },
        Shutdown { drain, cut },
    )
}

impl ShutdownTrigger {
    pub fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Also drains: a cut server accepts nothing new either.
    pub fn cut(&self) {
        self.drain.send_replace(true);
        self.cut.send_replace(true);
    }
}

async fn until_true(mut rx: watch::Receiver<bool>) {
    // An error means the trigger is gone: that never ends a request by itself.
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Shutdown {
    /// A shutdown that never comes (for a router served without a run loop, as in tests).
    pub fn never() -> Self {
        channel().1
    }

    pub async fn draining(&self) {
        until_true(self.drain.clone()).await
    }

    pub async fn cut(&self) {
        until_true(self.cut.clone()).await
    }
}
