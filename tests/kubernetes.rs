//! The Kubernetes manifests, run as far as they can be without a cluster:
//! the pod of `deploy/kubernetes/deployment.yaml` is laid out on disk as the
//! kubelet would (the ConfigMap and each Secret as a folder of symlinks
//! through `..data`, the accounts volume, an emptyDir for /tmp; Secret
//! values generated here), and the container's arguments run against it
//! with the binary cargo built (only ports and absolute paths are moved).
//! Its probes answer, a request over TLS is stamped, signed and carries the
//! pool's credential, and a kubelet-style `..data` swap of the ConfigMap,
//! the TLS Secret and the credentials Secret each apply without a restart.
//! The manifests' own invariants are checked too: non-root, read-only root,
//! resources, probe paths, a termination grace that covers preStop and the
//! gateway's shutdown, selectors and ports that agree across objects.
//! (Their schema is validated in CI by `scripts/lint-deploy`.)

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::tls::{client_for, presented_certificate, Protocol, TestCa, GATEWAY_NAME};
use support::{configmap_publish, free_port, shipped, Upstreams};

fn manifests() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            out.push(serde_json::to_value(value).expect("YAML as JSON"));
        }
    }
    out
}

fn find<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name}"))
}

fn of_kind<'a>(all: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = all.iter().filter(|m| m["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// Publishes `files` at `dir` as the kubelet does: `version/` with the
/// files, `..data` pointing at it, and each name a symlink through `..data`.
fn kubelet_publish(dir: &Path, version: &str, files: &BTreeMap<String, Vec<u8>>) {
    std::fs::create_dir_all(dir).expect("volume dir");
    let files: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    configmap_publish(dir, version, &files);
    for (name, _) in &files {
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("symlink");
        }
    }
}

/// The pod on disk: its root, and what was generated for it.
struct Pod {
    root: tempfile::TempDir,
    ca: TestCa,
    /// Volume name -> mount path in the pod.
    mounts: BTreeMap<String, String>,
    /// Generated Secret values, by Secret name and key.
    secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Listener and admin ports: in the manifest -> on this machine.
    ports: BTreeMap<u16, u16>,
}

impl Pod {
    fn path(&self, pod_path: &str) -> PathBuf {
        self.root.path().join(pod_path.trim_start_matches('/'))
    }

    fn port(&self, in_pod: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.ports[&in_pod]))
    }
}

/// The ConfigMap's files as this machine runs them: absolute pod paths
/// moved under `root`, ports moved to free ones, pool addresses to `ups`.
fn localize(
    files: &BTreeMap<String, Vec<u8>>,
    root: &Path,
    ports: &mut BTreeMap<u16, u16>,
    ups: &Upstreams,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (name, bytes) in files {
        let mut text = String::from_utf8(bytes.clone()).expect("UTF-8");
        // Marked first, so that a root under /tmp is not moved twice.
        for prefix in ["/var/", "/tmp/", "/etc/privacy-gateway"] {
            text = text.replace(&format!("\"{prefix}"), &format!("\"\0{prefix}"));
        }
        text = text.replace('\0', &root.display().to_string());
        if name == "gateway.toml" {
            let mut table: toml::Table = toml::from_str(&text).expect("gateway.toml");
            let mut rebind = |v: &mut toml::Value| {
                let a: std::net::SocketAddr = v.as_str().expect("address").parse().expect("addr");
                assert!(
                    a.ip().is_unspecified(),
                    "{a}: pods listen on every interface"
                );
                let port = match ports.get(&a.port()) {
                    Some(&port) => port,
                    None => {
                        // A released port can come back from the next bind:
                        // never give two listeners the same one.
                        let port = std::iter::repeat_with(free_port)
                            .find(|p| !ports.values().any(|v| v == p))
                            .expect("an endless supply");
                        ports.insert(a.port(), port);
                        port
                    }
                };
                *v = format!("{}:{port}", a.ip()).into();
            };
            for l in table["listener"].as_array_mut().expect("listeners") {
                rebind(&mut l["address"]);
            }
            rebind(&mut table["admin"]["address"]);
            text = toml::to_string(&table).expect("TOML");
        }
        if name == "pools.toml" {
            let mut table: toml::Table = toml::from_str(&text).expect("pools.toml");
            for pool in table["pool"].as_array_mut().expect("pools") {
                let echo = ups.pool(pool["name"].as_str().expect("name")).url();
                pool["addresses"] = vec![echo].into();
            }
            text = toml::to_string(&table).expect("TOML");
        }
        out.insert(name.clone(), text.into_bytes());
    }
    out
}

/// The files of ConfigMap `name` (its `data`).
fn configmap_files(all: &[Value], name: &str) -> BTreeMap<String, Vec<u8>> {
    find(all, "ConfigMap", name)["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("text").as_bytes().to_vec()))
        .collect()
}

/// Values for Secret `secret`'s keys: a certificate for TLS Secrets, long
/// random-looking strings otherwise; `generation` makes each call differ.
fn secret_values(secret: &Value, ca: &TestCa, generation: u32) -> BTreeMap<String, Vec<u8>> {
    let keys: Vec<String> = secret["stringData"]
        .as_object()
        .expect("stringData")
        .keys()
        .cloned()
        .collect();
    if secret["type"] == "kubernetes.io/tls" {
        let leaf = ca.leaf(GATEWAY_NAME);
        return [
            ("tls.crt".to_string(), leaf.cert_pem.into_bytes()),
            ("tls.key".to_string(), leaf.key_pem.into_bytes()),
        ]
        .into_iter()
        .collect();
    }
    keys.into_iter()
        .map(|k| {
            let value = format!(
                "{}-{k}-generation-{generation}-0123456789abcdef\n",
                secret["metadata"]["name"].as_str().unwrap_or_default()
            );
            (k, value.into_bytes())
        })
        .collect()
}

/// Lays the Deployment's pod out under a new root.
fn lay_out_pod(all: &[Value], ups: &Upstreams) -> Pod {
    let root = tempfile::tempdir().expect("root");
    let ca = TestCa::new("cluster CA");
    let spec = &find(all, "Deployment", "privacy-gateway")["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let mounts: BTreeMap<String, String> = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            assert!(
                m.get("subPath").is_none(),
                "a subPath mount is never updated: {m}"
            );
            (
                m["name"].as_str().expect("name").to_string(),
                m["mountPath"].as_str().expect("mountPath").to_string(),
            )
        })
        .collect();
    let mut pod = Pod {
        root,
        ca,
        mounts: mounts.clone(),
        secrets: BTreeMap::new(),
        ports: BTreeMap::new(),
    };
    for volume in spec["volumes"].as_array().expect("volumes") {
        let name = volume["name"].as_str().expect("volume name");
        let dir = pod.path(&mounts[name]);
        if let Some(cm) = volume.get("configMap") {
            let files = configmap_files(all, cm["name"].as_str().expect("name"));
            let files = localize(&files, pod.root.path(), &mut pod.ports, ups);
            kubelet_publish(&dir, "..2026_01_01_00_00_00.1", &files);
        } else if let Some(secret) = volume.get("secret") {
            let secret_name = secret["secretName"].as_str().expect("secretName");
            let values = secret_values(find(all, "Secret", secret_name), &pod.ca, 1);
            kubelet_publish(&dir, "..2026_01_01_00_00_00.1", &values);
            pod.secrets.insert(secret_name.to_string(), values);
        } else if volume.get("persistentVolumeClaim").is_some() {
            std::fs::create_dir_all(&dir).expect("accounts volume");
            std::fs::write(dir.join("accounts.jsonl"), shipped("accounts.jsonl"))
                .expect("accounts");
        } else if volume.get("emptyDir").is_some() {
            std::fs::create_dir_all(&dir).expect("emptyDir");
        } else {
            panic!("volume kind not laid out: {volume}");
        }
    }
    pod
}

struct Running(Child, PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

/// Starts the container's arguments (the image's entrypoint is the binary).
fn start_container(all: &[Value], pod: &Pod) -> Running {
    let container =
        &find(all, "Deployment", "privacy-gateway")["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg").to_string())
        .collect();
    let log = pod.root.path().join("container.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut command = Command::new(support::binary());
    for arg in &args {
        command.arg(if arg.starts_with('/') {
            pod.path(arg).display().to_string()
        } else {
            arg.clone()
        });
    }
    let child = command
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("start the container's command");
    Running(child, log)
}

/// `GET path` on the pod's admin port; the status (0 when nothing answers).
async fn probe(pod: &Pod, admin_port: u16, path: &str) -> u16 {
    let url = format!("http://{}{path}", pod.port(admin_port));
    match reqwest::get(url).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// A named container port's number.
fn container_port(container: &Value, name: &str) -> u16 {
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container port {name}")) as u16
}

#[test]
fn the_manifests_agree_with_each_other_and_with_the_gateway_configuration() {
    let all = manifests();
    let deployment = find(&all, "Deployment", "privacy-gateway");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    let spec = &deployment["spec"]["template"]["spec"];
    let container = &spec["containers"][0];

    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_ne!(spec["securityContext"]["runAsUser"], 0);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    for r in ["requests", "limits"] {
        assert!(
            container["resources"][r]["memory"].is_string(),
            "resources.{r}.memory"
        );
    }
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let rolling = &deployment["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(
        rolling["maxUnavailable"], 0,
        "a rollout never removes a ready replica first"
    );

    // Termination: preStop, then the gateway's grace and shutdown timeout, fit.
    let gateway: toml::Table = toml::from_str(
        std::str::from_utf8(&configmap_files(&all, "privacy-gateway-config")["gateway.toml"])
            .expect("UTF-8"),
    )
    .expect("gateway.toml");
    let process = &gateway["process"];
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .expect("preStop sleep");
    let needed = pre_stop
        + process["grace_period_seconds"].as_integer().expect("grace")
        + process["graceful_shutdown_timeout_seconds"]
            .as_integer()
            .expect("shutdown");
    let grace = spec["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace");
    assert!(
        grace > needed,
        "terminationGracePeriodSeconds {grace} <= {needed}"
    );

    // Ports: every listener and the admin address are container ports; probes use admin.
    let mut configured: BTreeSet<u16> = gateway["listener"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| {
            l["address"]
                .as_str()
                .expect("address")
                .rsplit(':')
                .next()
                .expect("port")
                .parse()
                .expect("port")
        })
        .collect();
    let admin: u16 = gateway["admin"]["address"]
        .as_str()
        .expect("admin")
        .rsplit(':')
        .next()
        .expect("port")
        .parse()
        .expect("port");
    configured.insert(admin);
    let declared: BTreeSet<u16> = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| p["containerPort"].as_u64().expect("port") as u16)
        .collect();
    assert_eq!(configured, declared);
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let port = container[probe]["httpGet"]["port"]
            .as_str()
            .expect("named port");
        assert_eq!(container_port(container, port), admin, "{probe}");
    }

    // Service, PDB and HPA point at these pods and ports.
    let service = of_kind(&all, "Service");
    assert_eq!(&service["spec"]["selector"], labels);
    for port in service["spec"]["ports"].as_array().expect("ports") {
        let target = port["targetPort"].as_str().expect("named targetPort");
        assert_ne!(
            container_port(container, target),
            admin,
            "the admin port stays out of the Service"
        );
    }
    assert_eq!(
        &of_kind(&all, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        labels
    );
    let hpa = of_kind(&all, "HorizontalPodAutoscaler");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert!(hpa["spec"]["minReplicas"].as_u64() >= Some(2));

    // The ConfigMap's rules are the repository's rules.
    let rules: toml::Table = toml::from_str(
        std::str::from_utf8(&configmap_files(&all, "privacy-gateway-config")["rules.toml"])
            .expect("UTF-8"),
    )
    .expect("rules.toml");
    let shipped_rules: toml::Table = toml::from_str(&shipped("rules.toml")).expect("rules");
    assert_eq!(
        rules, shipped_rules,
        "deploy/kubernetes/configmap.yaml rules.toml drifted from config/rules.toml"
    );

    // Its pools are the repository's, but for where they are and how they are reached.
    let terms = |text: &str| -> Vec<toml::Table> {
        let table: toml::Table = toml::from_str(text).expect("pools.toml");
        table["pool"]
            .as_array()
            .expect("pools")
            .iter()
            .map(|p| {
                let mut p = p.as_table().expect("pool").clone();
                for reached in [
                    "addresses",
                    "tls_server_name",
                    "tls_ca_file",
                    "health_check",
                    "credential",
                ] {
                    p.remove(reached);
                }
                p
            })
            .collect()
    };
    let files = configmap_files(&all, "privacy-gateway-config");
    assert_eq!(
        terms(std::str::from_utf8(&files["pools.toml"]).expect("UTF-8")),
        terms(&shipped("pools.toml")),
        "deploy/kubernetes/configmap.yaml pools.toml drifted from config/pools.toml"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pod_serves_and_reloads_on_every_kubelet_volume_swap() {
    let all = manifests();
    let ups = Upstreams::start().await;
    let pod = lay_out_pod(&all, &ups);
    let container =
        &find(&all, "Deployment", "privacy-gateway")["spec"]["template"]["spec"]["containers"][0];
    let admin = container_port(container, "admin");
    let https = container_port(container, "https");
    let running = start_container(&all, &pod);

    let mut ready = 0;
    for _ in 0..150 {
        ready = probe(&pod, admin, "/readyz").await;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ready,
        200,
        "the readiness probe never passed:\n{}",
        running.logs()
    );
    assert_eq!(probe(&pod, admin, "/healthz").await, 200);
    assert_eq!(
        probe(&pod, admin, "/metrics").await,
        401,
        "metrics need the admin token"
    );

    // A request through the TLS listener: stamped, signed, with the pool's credential.
    let c = client_for(Protocol::Http2OverTls, pod.port(https), Some(&pod.ca));
    let url = Protocol::Http2OverTls.url(pod.port(https), "/v1/chat/completions");
    let azure_value = |gen: &BTreeMap<String, BTreeMap<String, Vec<u8>>>| {
        String::from_utf8(gen["privacy-gateway-pool-credentials"]["azure-sweden"].clone())
            .expect("UTF-8")
            .trim()
            .to_string()
    };
    let send_eu = || async {
        let resp = support::send_as(&c, &url, "demo-api-eu-only").await;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}\n{}", running.logs());
        serde_json::from_str::<serde_json::Value>(&body).expect("echo JSON")
    };
    let mut seen = None;
    for _ in 0..20 {
        let body = send_eu().await;
        assert!(body["headers"]["x-privacy-signature"].is_string(), "{body}");
        if body["pool"] == "azure-sweden" {
            seen = Some(body);
            break;
        }
    }
    let seen = seen.expect("azure-sweden answered");
    assert_eq!(
        seen["headers"]["api-key"],
        azure_value(&pod.secrets).as_str(),
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-privacy-client-prefix"], "127.45.67.0/24");

    // The kubelet updates the credentials Secret, the TLS Secret and the ConfigMap.
    let creds = secret_values(
        find(&all, "Secret", "privacy-gateway-pool-credentials"),
        &pod.ca,
        2,
    );
    let rotated = String::from_utf8(creds["azure-sweden"].clone())
        .expect("UTF-8")
        .trim()
        .to_string();
    kubelet_publish(
        &pod.path(&pod.mounts["pool-credentials"]),
        "..2026_01_02_00_00_00.2",
        &creds,
    );
    let tls = secret_values(find(&all, "Secret", "privacy-gateway-tls"), &pod.ca, 2);
    kubelet_publish(
        &pod.path(&pod.mounts["tls"]),
        "..2026_01_02_00_00_00.2",
        &tls,
    );
    let mut ports = pod.ports.clone();
    let mut files = localize(
        &configmap_files(&all, "privacy-gateway-config"),
        pod.root.path(),
        &mut ports,
        &ups,
    );
    let rules = String::from_utf8(files["rules.toml"].clone()).expect("UTF-8");
    files.insert(
        "rules.toml".into(),
        rules
            .replace("ipv4_prefix = 24", "ipv4_prefix = 16")
            .into_bytes(),
    );
    kubelet_publish(
        &pod.path(&pod.mounts["config"]),
        "..2026_01_02_00_00_00.2",
        &files,
    );

    let renewed = support::tls::pem_to_der(std::str::from_utf8(&tls["tls.crt"]).expect("PEM"));
    let applied = std::sync::Mutex::new((false, false, false));
    support::eventually_async(Duration::from_secs(10), || async {
        let fresh = client_for(Protocol::Http2OverTls, pod.port(https), Some(&pod.ca));
        let body: serde_json::Value = support::send_as(&fresh, &url, "demo-api-eu-only")
            .await
            .json()
            .await
            .expect("JSON");
        let certificate = presented_certificate(pod.port(https), &pod.ca).await == renewed;
        let mut applied = applied.lock().expect("applied");
        applied.0 |= body["headers"]["x-privacy-client-prefix"] == "127.45.0.0/16";
        applied.1 |=
            body["pool"] == "azure-sweden" && body["headers"]["api-key"] == rotated.as_str();
        applied.2 = certificate;
        *applied == (true, true, true)
    })
    .await;
    let applied = applied.into_inner().expect("applied");
    assert_eq!(
        applied,
        (true, true, true),
        "(rules, credential, certificate) not all applied:\n{}",
        running.logs()
    );
    let logs = running.logs();
    for secret in [azure_value(&pod.secrets), rotated] {
        assert!(!logs.contains(&secret), "a credential in the logs");
    }
}
