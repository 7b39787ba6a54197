//! The documented cluster form of `--store` against a real three-node NATS cluster (issue 12.16):
//! three nats-servers clustered on loopback ports, a gateway given all three
//! (`nats://a,nats://b, nats://c`) with an R3 stream, events stored and streamed back in order.

mod binary;
mod nats;

use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};
use nats::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comma_separated_server_list_reaches_a_three_node_cluster_with_an_r3_stream() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let js = cluster.admin().await;
    // `nats://a,nats://b, nats://c`, as README writes it.
    let store = cluster.store_url();
    assert!(store.contains(", "), "{store}");
    let gateway = Process::start(&[
        "--store",
        &store,
        "--nats-replicas",
        "3",
        "--nats-stream",
        "IQGW_CLUSTER_LIST",
        "--nats-subject-prefix",
        "iqgw.cluster.list",
    ]);
    for id in 1..=20 {
        assert_eq!(gateway.post_event(id).await, 200);
    }
    let info = js
        .get_stream("IQGW_CLUSTER_LIST")
        .await
        .expect("the gateway's stream exists")
        .info()
        .await
        .expect("stream info")
        .clone();
    assert_eq!(info.config.num_replicas, 3, "an R3 stream");
    assert_eq!(info.state.messages, 20);
    let mut client = gateway.grpc().await;
    let mut stream = client
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribes")
        .into_inner();
    for sequence in 1..=20u64 {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("in time")
            .expect("no error")
            .expect("not ended");
        assert_eq!(event.sequence, sequence);
    }
    drop(cluster);
}

/// A gateway started while the cluster has no quorum (two of its three nodes down) does not exit:
/// it retries opening its stream, logging why, and serves once the nodes are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_the_cluster_has_no_quorum_waits_for_it_then_serves() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    cluster.kill(1);
    cluster.kill(2);
    let store = cluster.store_url();
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        cluster.spawn(1);
        cluster.spawn(2);
        cluster
    });
    // Returns once the gateway listens: after the stream could be opened.
    let gateway = Process::start(&[
        "--store",
        &store,
        "--nats-replicas",
        "3",
        "--nats-stream",
        "IQGW_NO_QUORUM",
        "--nats-subject-prefix",
        "iqgw.no.quorum",
    ]);
    let _cluster = back.join().expect("the nodes start again");
    let logged = gateway.logged();
    assert!(
        logged
            .iter()
            .any(|line| line.contains("JetStream cannot open the stream yet; retrying")),
        "the wait is logged:\n{}",
        logged.join("\n")
    );
    // The stream's leader may still be in election when the gateway listens: it serves within
    // moments (a post meanwhile is answered 503, never lost).
    let mut status = 0;
    for _ in 0..150 {
        status = gateway.post_event(1).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200, "the gateway serves once the nodes are back");
}
