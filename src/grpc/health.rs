//! `grpc.health.v1.Health` that ends with the gateway: tonic-health's service, whose `Watch`
//! streams would otherwise stay open until the client leaves and hold the shutdown for the whole
//! grace period. At shutdown each watch reports NOT_SERVING (if it has not yet) and ends with
//! UNAVAILABLE, like the event streams.

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// Responses a watch holds for a client that does not read; when full, the watch waits (status
/// changes are rare; a newer one replaces nothing, so the client sees each in order).
const WATCH_BUFFER: usize = 4;

/// The health service and the reporter that sets its statuses; its watches end once `shutdown`
/// turns true.
pub fn service(shutdown: watch::Receiver<bool>) -> (HealthReporter, HealthServer<DrainingHealth>) {
    let reporter = HealthReporter::new();
    let inner = HealthService::from_health_reporter(reporter.clone());
    (
        reporter,
        HealthServer::new(DrainingHealth { inner, shutdown }),
    )
}

/// tonic-health's service, with watches that end at shutdown.
pub struct DrainingHealth {
    inner: HealthService,
    shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut statuses = self.inner.watch(request).await?.into_inner();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                tokio::select! {
                    status = statuses.next() => match status {
                        Some(Ok(response)) => {
                            last = Some(response.status);
                            if tx.send(Ok(response)).await.is_err() {
                                return; // The client left.
                            }
                        }
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        None => break,
                    },
                    // Shutdown, or the gateway gone: end the watch either way.
                    () = stopping(&mut shutdown) => break,
                    _ = tx.closed() => return,
                }
            }
            let not_serving = ServingStatus::NotServing as i32;
            if last != Some(not_serving) {
                let response = HealthCheckResponse {
                    status: not_serving,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(Err(Status::unavailable("the gateway is shutting down")))
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Resolves once `shutdown` is true or its sender is gone.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; only whether it resolved matters.
    let _ = shutdown.wait_for(|stopping| *stopping).await.is_ok();
}
