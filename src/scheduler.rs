//! Runs plugins' periodic tasks ([`crate::plugin::BuildContext::every`]) while the snapshot that
//! holds them is live: each tick looks only at the live snapshot, so a reload retires its
//! predecessor's tasks without waiting for them (a run in progress finishes on its own).

use crate::shared::Shared;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Scheduler {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for Scheduler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.round(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl Scheduler {
    fn round(&self) {
        let snap = self.shared.snapshot();
        for task in &snap.tasks {
            {
                let mut last = task.last.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_some_and(|t| t.elapsed() < task.period) {
                    continue;
                }
                *last = Some(Instant::now());
            }
            tokio::spawn((task.run)());
        }
    }
}
