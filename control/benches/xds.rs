//! The control plane at scale (issue 9): a synthetic mesh of 1,000 services and 10,000
//! endpoints served to 1,000 connected xDS clients over loopback gRPC, first all on
//! state-of-the-world ADS, then all on delta ADS:
//!
//! - time from a config change (one endpoint added) to every client having ACKed it,
//!   p50 and p99 over the clients;
//! - the control plane's CPU time for that change, and its resident memory per connected
//!   proxy (the growth from before the clients connected, ÷ clients);
//! - bytes pushed for the one-endpoint change, delta ÷ state of the world.
//!
//! The control plane runs in this process; the clients run in a second one the benchmark
//! starts (this binary again, told by `LUMEN_XDS_SWARM` where to connect), so the memory and
//! CPU measured are the control plane's own, not the clients' decoding. The swarm prints
//! `ack <i>` each time client i ACKs endpoints; times are taken as those lines arrive.
//!
//! `cargo bench -p lumen-control --bench xds` (knobs: `LUMEN_BENCH_SERVICES`, default 1,000;
//! `LUMEN_BENCH_CLIENTS`, default 1,000; 10 endpoints a service).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lumen_api::pb::envoy::config::core::v3::Node;
use lumen_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use lumen_api::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use lumen_api::type_url;
use lumen_control::model::Model;
use lumen_control::{ConfigSource, Control, ControlOptions, XdsState};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The system allocator, counting: the bytes live on the heap are the control plane's memory
/// per proxy without what the allocator holds on to after a burst.
#[global_allocator]
static ALLOCATOR: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// Bytes live on the heap now (a reallocation is counted in both totals already).
fn live_heap() -> usize {
    let s = ALLOCATOR.stats();
    s.bytes_allocated.saturating_sub(s.bytes_deallocated)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `services` Services of 10 pods each (addresses in 10.0.0.0/8, never dialled).
fn mesh(services: usize) -> Model {
    let mut yaml = String::new();
    for s in 0..services {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: default}}\nspec:\n  selector: {{app: svc-{s}}}\n  ports: [{{name: http, port: 9080}}]\n---\n"
        ));
        for p in 0..10 {
            let n = s * 10 + p;
            yaml.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: svc-{s}-{p}\n  namespace: default\n  labels: {{app: svc-{s}, version: v1}}\nspec:\n  containers: [{{name: app, ports: [{{containerPort: 9080}}]}}]\nstatus: {{podIP: 10.{}.{}.{}}}\n---\n",
                n / 65536 % 256,
                n / 256 % 256,
                n % 256
            ));
        }
    }
    let mut model = Model::from_yaml("mesh", &yaml).expect("the synthetic mesh parses");
    model.check();
    assert!(model.rejected.is_empty(), "{:?}", model.rejected);
    model
}

/// The model with one more endpoint for `svc-0`.
fn one_more_endpoint(model: &Model, nth: usize) -> Model {
    let mut grown = model.clone();
    let mut pod = grown.pods[0].clone();
    pod.meta.name = format!("svc-0-extra-{nth}");
    pod.ip = format!("11.0.{}.{}", nth / 256, nth % 256)
        .parse()
        .expect("ip");
    grown.pods.push(pod);
    grown
}

fn node(i: usize) -> Node {
    Node {
        id: format!(
            "sidecar~10.200.{}.{}~client-{i}.default~default.svc.cluster.local",
            i / 256,
            i % 256
        ),
        ..Default::default()
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 a second on Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// What each client reports: every time it ACKs an EDS response, the instant.
type Acks = mpsc::UnboundedSender<(usize, Instant)>;

/// A state-of-the-world client: CDS and LDS wildcards, EDS for every cluster CDS names,
/// RDS for `9080`; every response ACKed at once.
async fn sotw_client(
    channel: tonic::transport::Channel,
    i: usize,
    acks: Acks,
    stop: CancellationToken,
) {
    let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let request = |ty: &str, names: Vec<String>, version: String, nonce: String| DiscoveryRequest {
        node: Some(node(i)),
        type_url: ty.to_string(),
        resource_names: names,
        version_info: version,
        response_nonce: nonce,
        ..Default::default()
    };
    let _ = tx.send(request(
        type_url::CLUSTER,
        vec![],
        String::new(),
        String::new(),
    ));
    let _ = tx.send(request(
        type_url::LISTENER,
        vec![],
        String::new(),
        String::new(),
    ));
    let Ok(resp) = client
        .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut stream = resp.into_inner();
    let mut eds_names: Vec<String> = Vec::new();
    let mut rds_asked = false;
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return,
            m = stream.message() => m,
        };
        let Ok(Some(r)) = msg else { return };
        let mut names = Vec::new();
        if r.type_url == type_url::CLUSTER {
            names = r
                .resources
                .iter()
                .filter_map(|a| {
                    <lumen_api::pb::envoy::config::cluster::v3::Cluster as prost::Message>::decode(
                        a.value.as_slice(),
                    )
                    .ok()
                    .map(|c| c.name)
                })
                .collect();
        }
        let _ = tx.send(request(
            &r.type_url,
            match r.type_url.as_str() {
                t if t == type_url::ENDPOINT => eds_names.clone(),
                t if t == type_url::ROUTE => vec!["9080".to_string()],
                _ => vec![],
            },
            r.version_info.clone(),
            r.nonce.clone(),
        ));
        if r.type_url == type_url::CLUSTER && names != eds_names {
            eds_names = names;
            let _ = tx.send(request(
                type_url::ENDPOINT,
                eds_names.clone(),
                String::new(),
                String::new(),
            ));
        }
        if r.type_url == type_url::LISTENER && !rds_asked {
            rds_asked = true;
            let _ = tx.send(request(
                type_url::ROUTE,
                vec!["9080".into()],
                String::new(),
                String::new(),
            ));
        }
        if r.type_url == type_url::ENDPOINT {
            let _ = acks.send((i, Instant::now()));
        }
    }
}

/// A delta client: wildcard CDS and LDS, EDS for every cluster it learns, RDS `9080`.
async fn delta_client(
    channel: tonic::transport::Channel,
    i: usize,
    acks: Acks,
    stop: CancellationToken,
) {
    let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let subscribe = |ty: &str, names: Vec<String>| DeltaDiscoveryRequest {
        node: Some(node(i)),
        type_url: ty.to_string(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    let _ = tx.send(subscribe(type_url::CLUSTER, vec![]));
    let _ = tx.send(subscribe(type_url::LISTENER, vec![]));
    let _ = tx.send(subscribe(type_url::ROUTE, vec!["9080".into()]));
    let Ok(resp) = client
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut stream = resp.into_inner();
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return,
            m = stream.message() => m,
        };
        let Ok(Some(r)) = msg else { return };
        let _ = tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        });
        if r.type_url == type_url::CLUSTER && !r.resources.is_empty() {
            let names = r.resources.iter().map(|x| x.name.clone()).collect();
            let _ = tx.send(subscribe(type_url::ENDPOINT, names));
        }
        if r.type_url == type_url::ENDPOINT {
            let _ = acks.send((i, Instant::now()));
        }
    }
}

struct Run {
    label: &'static str,
    connect: Duration,
    rss_per_client: f64,
    heap_per_client: f64,
    peak_per_client: f64,
    p50: Duration,
    p99: Duration,
    cpu: f64,
    change_bytes: u64,
    cluster_change_bytes: u64,
}

async fn run(label: &'static str, delta: bool, model: &Model, clients: usize) -> Run {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let control = Control::bind(ControlOptions {
        xds_addr: any,
        http_addr: any,
        source: ConfigSource::Static(model.clone()),
    })
    .await
    .expect("control binds");
    let xds = control.xds_addr().expect("xds");
    let state: Arc<XdsState> = control.state();
    let models: watch::Sender<Arc<Model>> = control.model_sender();
    let stop = CancellationToken::new();
    tokio::spawn(control.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_bytes();
    let live_before = live_heap();

    let started = Instant::now();
    // The heap's peak while the clients connect and sync, sampled every 2 ms: what the
    // allocator is asked for at once, which is what it may keep after.
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(live_heap(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let (mut swarm, mut acks) = swarm(xds, delta, clients);
    // Connected and synced: every client has ACKed endpoints, and the acknowledgements the
    // server holds are settled.
    let mut seen = vec![false; clients];
    let mut n = 0;
    while n < clients {
        let Some((i, _)) = tokio::time::timeout(Duration::from_secs(300), acks.recv())
            .await
            .expect("every client synced within 300 s")
        else {
            break;
        };
        if !seen[i] {
            seen[i] = true;
            n += 1;
        }
    }
    // ...and the control plane has nothing more to send (a delta stream's first push comes
    // in chunks, each ACKed before all are in): its pushed bytes still for 2 s.
    let mut last = state.pushed_bytes.load(Ordering::Relaxed);
    let quiet_started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = state.pushed_bytes.load(Ordering::Relaxed);
        if now == last || quiet_started.elapsed() > Duration::from_secs(300) {
            break;
        }
        last = now;
    }
    let connect = started.elapsed();
    while acks.try_recv().is_ok() {}
    let rss_per_client = rss_bytes().saturating_sub(rss_before) as f64 / clients as f64;
    let heap_per_client = live_heap().saturating_sub(live_before) as f64 / clients as f64;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let peak_per_client =
        peak.load(Ordering::Relaxed).saturating_sub(live_before) as f64 / clients as f64;

    // The change: one endpoint more for svc-0.
    let bytes_before = state.pushed_bytes.load(Ordering::Relaxed);
    let cpu_before = cpu_seconds();
    let t0 = Instant::now();
    models.send_replace(Arc::new(one_more_endpoint(model, 1)));
    let mut took: BTreeMap<usize, Duration> = BTreeMap::new();
    while took.len() < clients {
        let Some((i, at)) = tokio::time::timeout(Duration::from_secs(300), acks.recv())
            .await
            .expect("every client took the change within 300 s")
        else {
            break;
        };
        took.entry(i).or_insert(at - t0);
    }
    let cpu = cpu_seconds() - cpu_before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let change_bytes = state.pushed_bytes.load(Ordering::Relaxed) - bytes_before;

    // A second change, to one cluster (a DestinationRule for svc-1): bytes until the
    // control plane is quiet again.
    let mut ruled = one_more_endpoint(model, 1);
    ruled
        .add_yaml(
            "dr",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc-1, namespace: default}\nspec:\n  host: svc-1\n  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n",
        )
        .expect("a DestinationRule");
    let bytes_before = state.pushed_bytes.load(Ordering::Relaxed);
    models.send_replace(Arc::new(ruled));
    let mut last = bytes_before;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = state.pushed_bytes.load(Ordering::Relaxed);
        if now == last && now > bytes_before {
            break;
        }
        last = now;
    }
    let cluster_change_bytes = last - bytes_before;
    let mut times: Vec<Duration> = took.into_values().collect();
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    let _ = swarm.kill();
    let _ = swarm.wait();
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    Run {
        label,
        connect,
        rss_per_client,
        heap_per_client,
        peak_per_client,
        p50: at(0.50),
        p99: at(0.99),
        cpu,
        change_bytes,
        cluster_change_bytes,
    }
}

/// Starts the clients in a process of their own; their ACKs arrive on the receiver, timed
/// as they arrive.
fn swarm(
    xds: SocketAddr,
    delta: bool,
    clients: usize,
) -> (
    std::process::Child,
    mpsc::UnboundedReceiver<(usize, Instant)>,
) {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("this benchmark's binary");
    let mut child = std::process::Command::new(exe)
        .env(
            "LUMEN_XDS_SWARM",
            format!("{xds};{};{clients}", u8::from(delta)),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the client swarm starts");
    let stdout = child.stdout.take().expect("the swarm's stdout");
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(i) = line.strip_prefix("ack ").and_then(|i| i.parse().ok()) {
                let _ = tx.send((i, Instant::now()));
            }
        }
    });
    (child, rx)
}

/// The swarm's side: `clients` clients on 10 connections to `xds`, each ACK of endpoints
/// printed as `ack <i>`; ends when its stdin closes (the benchmark killed or gone).
fn run_swarm(spec: &str) {
    use std::io::Write;
    let mut parts = spec.split(';');
    let xds: SocketAddr = parts
        .next()
        .and_then(|a| a.parse().ok())
        .expect("LUMEN_XDS_SWARM: the xDS address");
    let delta = parts.next() == Some("1");
    let clients: usize = parts
        .next()
        .and_then(|n| n.parse().ok())
        .expect("LUMEN_XDS_SWARM: the number of clients");
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = runtime();
    runtime.block_on(async {
        // 10 connections, each multiplexing a tenth of the clients' streams.
        let mut channels = Vec::new();
        for _ in 0..10 {
            channels.push(
                tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
                    .expect("endpoint")
                    .http2_adaptive_window(true)
                    .connect()
                    .await
                    .expect("connects"),
            );
        }
        let (acks_tx, mut acks) = mpsc::unbounded_channel::<(usize, Instant)>();
        let stop = CancellationToken::new();
        for i in 0..clients {
            let channel = channels[i % channels.len()].clone();
            let (acks_tx, stop) = (acks_tx.clone(), stop.clone());
            if delta {
                tokio::spawn(delta_client(channel, i, acks_tx, stop));
            } else {
                tokio::spawn(sotw_client(channel, i, acks_tx, stop));
            }
        }
        drop(acks_tx);
        let mut out = std::io::stdout().lock();
        while let Some((i, _)) = acks.recv().await {
            let mut lines = format!("ack {i}\n");
            while let Ok((i, _)) = acks.try_recv() {
                lines.push_str(&format!("ack {i}\n"));
            }
            if out
                .write_all(lines.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                break;
            }
        }
    });
}

/// Two worker threads, for the control plane and for the swarm alike.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    if let Ok(spec) = std::env::var("LUMEN_XDS_SWARM") {
        run_swarm(&spec);
        return;
    }
    let services = env("LUMEN_BENCH_SERVICES", 1000);
    let clients = env("LUMEN_BENCH_CLIENTS", 1000);
    let runtime = runtime();
    runtime.block_on(async {
        let model = mesh(services);
        println!(
            "synthetic mesh: {} services, {} endpoints, {clients} xDS clients over 10 loopback connections",
            model.services.len(),
            model.pods.len()
        );
        // The second run starts with what the allocator kept from the first: its resident
        // growth is smaller than alone. `LUMEN_BENCH_DELTA_FIRST=1` runs delta first.
        let delta_first = std::env::var_os("LUMEN_BENCH_DELTA_FIRST").is_some();
        let (sotw, delta) = if delta_first {
            let delta = run("delta", true, &model, clients).await;
            (run("state of the world", false, &model, clients).await, delta)
        } else {
            let sotw = run("state of the world", false, &model, clients).await;
            (sotw, run("delta", true, &model, clients).await)
        };
        println!(
            "first run: {}",
            if delta_first { "delta" } else { "state of the world" }
        );
        println!("| measure | state of the world | delta | goal |");
        println!("|---|---|---|---|");
        for r in [&sotw, &delta] {
            println!(
                "| {}: all clients synced from connect | {:.1} s | | |",
                r.label,
                r.connect.as_secs_f64()
            );
        }
        println!(
            "| one endpoint added → every client ACKed, p50 | {:.0} ms | {:.0} ms | |",
            sotw.p50.as_secs_f64() * 1e3,
            delta.p50.as_secs_f64() * 1e3
        );
        println!(
            "| one endpoint added → every client ACKed, p99 | {:.0} ms | {:.0} ms | < 1,000 ms |",
            sotw.p99.as_secs_f64() * 1e3,
            delta.p99.as_secs_f64() * 1e3
        );
        println!(
            "| control-plane CPU for the change | {:.2} s | {:.2} s | |",
            sotw.cpu, delta.cpu
        );
        println!(
            "| heap live per connected proxy | {:.1} KB | {:.1} KB | < 50 KB |",
            sotw.heap_per_client / 1024.0,
            delta.heap_per_client / 1024.0
        );
        println!(
            "| heap peak per connected proxy during the first sync | {:.0} KB | {:.0} KB | |",
            sotw.peak_per_client / 1024.0,
            delta.peak_per_client / 1024.0
        );
        println!(
            "| resident memory per connected proxy (with what the allocator keeps) | {:.0} KB | {:.0} KB | < 50 KB |",
            sotw.rss_per_client / 1024.0,
            delta.rss_per_client / 1024.0
        );
        println!(
            "| bytes pushed for the endpoint change | {} | {} | |",
            sotw.change_bytes, delta.change_bytes
        );
        println!(
            "| bytes for the endpoint change, delta ÷ state of the world | | {:.3} | |",
            delta.change_bytes as f64 / sotw.change_bytes.max(1) as f64
        );
        println!(
            "| bytes pushed for one cluster changed (a DestinationRule) | {} | {} | |",
            sotw.cluster_change_bytes, delta.cluster_change_bytes
        );
        println!(
            "| bytes for the cluster change, delta ÷ state of the world | | **{:.4}** | ≤ 0.1 |",
            delta.cluster_change_bytes as f64 / sotw.cluster_change_bytes.max(1) as f64
        );
    });
}
