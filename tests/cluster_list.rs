//! The documented cluster form of `--store` against a real three-node NATS cluster (issue 12.16):
//! three nats-servers clustered on loopback ports, a gateway given all three
//! (`nats://a,nats://b, nats://c`) with an R3 stream, events stored and streamed back in order.

mod binary;
mod nats;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use binary::{event, Process};
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// A nats-server node of the cluster; killed on drop.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comma_separated_server_list_reaches_a_three_node_cluster_with_an_r3_stream() {
    let has_server = Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok();
    if !nats::require("the nats-server binary", has_server) {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let others: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
            .collect();
        let config = format!(
            "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\n\
             cluster {{ name: iqgw, listen: 127.0.0.1:{}, routes: [{}] }}\n",
            clients[i],
            dir.path().join(format!("n{i}")).display(),
            routes[i],
            others.join(", ")
        );
        let file = dir.path().join(format!("n{i}.conf"));
        std::fs::write(&file, config).expect("config written");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        nodes.push(Node(child));
    }
    // Wait until the cluster has a JetStream meta leader: an R3 stream can be created.
    let admin = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(client) = async_nats::connect(format!("127.0.0.1:{}", clients[0])).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the cluster accepts connections");
    let js = async_nats::jetstream::new(admin);
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let created = js
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "IQGW_PROBE".into(),
                    subjects: vec!["iqgw.probe".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await;
            if created.is_ok() {
                let _ = js.delete_stream("IQGW_PROBE").await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "the cluster elected no JetStream leader in time"
    );

    let store = format!(
        "nats://127.0.0.1:{},nats://127.0.0.1:{}, nats://127.0.0.1:{}",
        clients[0], clients[1], clients[2]
    );
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
    let http = reqwest::Client::new();
    for id in 1..=20 {
        let response = http
            .post(gateway.url("/v1/events"))
            .header("content-type", "application/json")
            .body(event(id))
            .send()
            .await
            .expect("posted");
        assert_eq!(response.status(), 200);
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
    drop(nodes);
}
