//! The Kubernetes manifests (deploy/k8s) against the real server: every metric they name is
//! one the server exports, every probe and scrape path answers on the port they name (the
//! probes without the API key), the container's flags parse, and the autoscalers target the
//! Deployment. `.ci/run` renders the overlays with kustomize and validates each object against
//! the Kubernetes schema; the custom resources (PodMonitor, ScaledObject), which that schema
//! does not cover, are checked here.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Parser;
use exitserve::config::{Args, Settings};
use serde::Deserialize;
use serde_yaml::Value;

use common::server::TestServer;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

/// Every document of every manifest, with its file.
fn documents() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            docs.push((f.clone(), Value::deserialize(doc).unwrap()));
        }
    }
    assert!(docs.len() >= 12, "{} documents", docs.len());
    docs
}

fn of_kind<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

fn base_deployment(docs: &[(PathBuf, Value)]) -> &Value {
    docs.iter()
        .find(|(f, d)| d["kind"] == "Deployment" && f.ends_with("base/deployment.yaml"))
        .map(|(_, d)| d)
        .expect("base/deployment.yaml")
}

/// `exitserve_…` names anywhere in the manifests: HPA metrics, KEDA and adapter queries.
fn referenced_metrics() -> BTreeSet<String> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("exitserve_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_manifests_name_is_exported() {
    let server = TestServer::start(&[]);
    let exposition = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let names = referenced_metrics();
    for want in ["exitserve_queue_depth", "exitserve_kv_cache_usage_ratio"] {
        assert!(
            names.contains(want),
            "the autoscalers use {want}: {names:?}"
        );
    }
    for name in &names {
        assert!(
            exposition.contains(&format!("# TYPE {name} gauge\n")),
            "{name} is named in deploy/k8s but the server exports no such gauge"
        );
    }
    // The HPA reads them as per-pod metrics through prometheus-adapter: each has a rule.
    let adapter =
        std::fs::read_to_string(deploy_dir().join("prometheus-adapter/values.yaml")).unwrap();
    let docs = documents();
    for hpa in of_kind(&docs, "HorizontalPodAutoscaler") {
        for m in hpa["spec"]["metrics"].as_sequence().unwrap() {
            let name = m["pods"]["metric"]["name"].as_str().unwrap();
            assert!(
                adapter.contains(&format!("as: {name}\n")),
                "no prometheus-adapter rule serves {name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_scrapes_reach_real_routes_on_the_named_port() {
    let server = TestServer::start(&["--api-key", "k8s-secret"]);
    let docs = documents();
    let deployment = base_deployment(&docs);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let ports: Vec<(&str, u64)> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    let client = reqwest::Client::new();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        let port = get["port"].as_str().unwrap();
        assert!(ports.iter().any(|(n, _)| *n == port), "{probe} port {port}");
        // Kubelet sends no credentials: the probe path must answer without the key.
        let path = get["path"].as_str().unwrap();
        let r = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{probe} {path}");
    }
    for monitor in of_kind(&docs, "PodMonitor") {
        for ep in monitor["spec"]["podMetricsEndpoints"]
            .as_sequence()
            .unwrap()
        {
            let port = ep["port"].as_str().unwrap();
            assert!(
                ports.iter().any(|(n, _)| *n == port),
                "PodMonitor port {port}"
            );
            assert_eq!(ep["authorization"]["type"], "Bearer");
            let path = ep["path"].as_str().unwrap();
            let r = client
                .get(server.url(path))
                .bearer_auth("k8s-secret")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "PodMonitor {path}");
            assert!(r
                .text()
                .await
                .unwrap()
                .contains("# TYPE exitserve_queue_depth gauge"));
        }
        assert_eq!(
            monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            "exitserve"
        );
    }
    for service in of_kind(&docs, "Service") {
        for p in service["spec"]["ports"].as_sequence().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert!(
                ports.iter().any(|(n, _)| *n == target),
                "Service targetPort {target}"
            );
        }
    }
}

#[test]
fn container_flags_parse_and_match_the_port() {
    let docs = documents();
    let http_port = base_deployment(&docs)["spec"]["template"]["spec"]["containers"][0]["ports"][0]
        ["containerPort"]
        .as_u64()
        .unwrap();
    let mut checked = 0;
    for deployment in of_kind(&docs, "Deployment") {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let mut argv = vec!["exitserve".to_string()];
        argv.extend(
            container["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string()),
        );
        let args = Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let settings = Settings::resolve(args).unwrap();
        assert_eq!(u64::from(settings.port), http_port, "{argv:?}");
        assert_eq!(
            settings.host, "0.0.0.0",
            "a pod must listen beyond loopback"
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "the base and the example overlay's patch");
}

#[test]
fn autoscalers_target_the_deployment_and_agree() {
    let docs = documents();
    let name = base_deployment(&docs)["metadata"]["name"].as_str().unwrap();
    let hpas = of_kind(&docs, "HorizontalPodAutoscaler");
    let scaled = of_kind(&docs, "ScaledObject");
    assert_eq!((hpas.len(), scaled.len()), (1, 1));
    let (hpa, keda) = (hpas[0], scaled[0]);
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], name);
    assert_eq!(keda["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(keda["spec"]["scaleTargetRef"]["name"], name);
    assert_eq!(
        hpa["spec"]["minReplicas"], keda["spec"]["minReplicaCount"],
        "the two alternatives scale the same range"
    );
    assert_eq!(hpa["spec"]["maxReplicas"], keda["spec"]["maxReplicaCount"]);
    for t in keda["spec"]["triggers"].as_sequence().unwrap() {
        assert_eq!(t["type"], "prometheus");
        let query = t["metadata"]["query"].as_str().unwrap();
        assert!(query.contains("exitserve_"), "{query}");
        assert!(
            t["metadata"]["threshold"]
                .as_str()
                .unwrap()
                .parse::<f64>()
                .unwrap()
                > 0.0
        );
    }
}
