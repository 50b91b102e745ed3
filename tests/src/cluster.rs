//! A stand-in for a Kubernetes cluster where none can run (no container engine, no kubelet):
//! the chart is rendered with `helm template`, and every workload runs as a local process
//! exactly as a pod would get it.
//!
//! What each process gets, as the kubelet would give it:
//! - the container's `command` and `args` (paths of the image mapped to the local binaries);
//! - every `env` entry: literals, `resourceFieldRef` (CPU, from the container's resources), and
//!   `secretKeyRef` / `configMapKeyRef` / `fieldRef` resolved
//!   from the Secrets and ConfigMaps the test created (a missing one fails the pod, as
//!   `CreateContainerConfigError` would);
//! - the service-link variables of every Service of the release (`<NAME>_SERVICE_HOST`,
//!   `<NAME>_PORT_<n>_TCP…`) unless the pod sets `enableServiceLinks: false`;
//! - each volume at its mount path, under a per-pod root folder that stands for `/` (Secret
//!   volumes written as the kubelet writes them, claims linked to folders the test names);
//!   every absolute path in env values and arguments that falls under a mount is rewritten to
//!   that folder, so the chart's paths must agree with each other to work;
//! - its own network namespace: each `containerPort` becomes a free port on 127.0.0.1, and
//!   `0.0.0.0:<containerPort>` in env values is rewritten to it;
//! - cluster DNS: `https://<service>:<port>` is rewritten to a local TCP proxy that stands for
//!   the Service's ClusterIP and forwards each connection to a ready pod its selector names
//!   (round robin per connection, as kube-proxy does);
//! - the probes, run as the kubelet runs them (exec commands with the pod's environment, HTTP
//!   GETs on the named port); a pod joins its Services' endpoints once ready;
//! - termination as the kubelet does it: leave the endpoints, run the preStop hook, SIGTERM,
//!   SIGKILL after `terminationGracePeriodSeconds`;
//! - Helm's hooks: `install` runs the `pre-install` hook Jobs one at a time, in weight order,
//!   each to completion (a failed pod replaced until `backoffLimit`), before any Deployment.
//!
//! What it cannot show: the processes run as this user, so read-only mounts and the read-only
//! root filesystem are checked afterwards (nothing changed under them) rather than enforced
//! by the kernel; resource limits, scheduling and NetworkPolicies are not applied.

#![allow(clippy::missing_panics_doc)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// How often a probe is retried while waiting for a pod (the chart's `periodSeconds` would
/// make the test slower without testing anything more).
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Restarts of a container that exits before it is ready, and the pause before each (the
/// kubelet starts at 10 s and doubles; shorter here, the behaviour is the same).
const MAX_RESTARTS: u32 = 3;
const RESTART_BACK_OFF: Duration = Duration::from_secs(1);

/// Runs `helm template <release> helm/medai --namespace <namespace> -f <values>` through
/// `scripts/helm.sh` and returns the rendered objects.
pub fn render_chart(release: &str, namespace: &str, values: &Path) -> Vec<Value> {
    let root = medai_testkit::workspace_root();
    let output = std::process::Command::new("bash")
        .arg(root.join("scripts/helm.sh"))
        .args(["template", release, "helm/medai", "--namespace", namespace])
        .arg("--values")
        .arg(values)
        .current_dir(&root)
        .output()
        .expect("run scripts/helm.sh");
    assert!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_manifests(&String::from_utf8(output.stdout).expect("UTF-8 manifests"))
}

/// As [`render_chart`], with several values files (later ones override earlier ones, as
/// `helm template -f a -f b` does).
pub fn render_chart_with(release: &str, namespace: &str, values: &[&Path]) -> Vec<Value> {
    let root = medai_testkit::workspace_root();
    let mut command = std::process::Command::new("bash");
    command.arg(root.join("scripts/helm.sh")).args([
        "template",
        release,
        "helm/medai",
        "--namespace",
        namespace,
    ]);
    for file in values {
        command.arg("--values").arg(file);
    }
    let output = command
        .current_dir(&root)
        .output()
        .expect("run scripts/helm.sh");
    assert!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_manifests(&String::from_utf8(output.stdout).expect("UTF-8 manifests"))
}

/// Every YAML document of a multi-document stream, as JSON values (empty documents skipped).
pub fn parse_manifests(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("a YAML document"))
        .filter(|value| !value.is_null())
        .collect()
}

/// What the test provides in place of the cluster's API objects and images.
#[derive(Default)]
pub struct ClusterObjects {
    /// Secret name → key → bytes.
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// ConfigMap name → key → text.
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// PersistentVolumeClaim name → the local folder that holds its volume.
    pub claims: BTreeMap<String, PathBuf>,
    /// A file's path inside the images → the local file (binaries, libraries).
    pub image_files: BTreeMap<String, PathBuf>,
}

/// A hook Job run to completion: its name, the exit of each of its pods, the last pod's log.
pub struct HookRun {
    pub job: String,
    pub attempts: Vec<ExitStatus>,
    pub log: String,
}

/// Ready pods behind a Service: each pod's name and its address for each Service port.
type Endpoints = Arc<Mutex<Vec<(String, Vec<SocketAddr>)>>>;
/// Every file under a folder with its size and modification time.
type Snapshot = Vec<(PathBuf, u64, SystemTime)>;

struct ServicePort {
    port: u16,
    name: Option<String>,
    target: Value,
    local: SocketAddr,
}

struct ClusterService {
    name: String,
    /// `clusterIP: None`: no service-link variables.
    headless: bool,
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
    /// Ready pods and their address for each of `ports` (by index).
    endpoints: Endpoints,
    proxies: Vec<JoinHandle<()>>,
}

/// One running pod.
pub struct Pod {
    pub name: String,
    pub owner: String,
    labels: BTreeMap<String, String>,
    spec: Value,
    child: Child,
    /// containerPort (name and number) → local address.
    ports: Vec<(Option<String>, u16, SocketAddr)>,
    environment: Vec<(String, String)>,
    command: Vec<String>,
    root: PathBuf,
    log: PathBuf,
    /// Times the container was restarted (restartPolicy Always) before it became ready.
    pub restarts: u32,
    /// Local folders of read-only mounts, and what they held when the pod started.
    read_only: Vec<(PathBuf, Snapshot)>,
    /// Mount points (local), so writes outside them show up as writes to the root filesystem.
    mount_points: Vec<PathBuf>,
}

impl Pod {
    /// The local address of the container port named `name`.
    pub fn port(&self, name: &str) -> SocketAddr {
        self.ports
            .iter()
            .find(|(port_name, _, _)| port_name.as_deref() == Some(name))
            .map(|(_, _, local)| *local)
            .unwrap_or_else(|| panic!("pod {} has no port {name}", self.name))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The environment the pod's process got (for assertions on what the chart gives it).
    pub fn environment(&self) -> &[(String, String)] {
        &self.environment
    }
}

pub struct LocalCluster {
    pub namespace: String,
    manifests: Vec<Value>,
    objects: ClusterObjects,
    root: tempfile::TempDir,
    services: Vec<ClusterService>,
    pub pods: Vec<Pod>,
    started: AtomicUsize,
}

fn text(value: &Value, pointer: &str) -> Option<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn labels(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A local port free now, for a container port the pod's process binds later. Chosen below
/// the kernel's ephemeral range: a port from that range (a `bind` to port 0) could be handed to
/// another test's listener before the pod binds it, and a restarted pod would then find it
/// taken every time (seen in CI: "Address already in use", CrashLoopBackOff).
fn free_local_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    let ephemeral_start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    const LOWEST: u32 = 10_000;
    let span = ephemeral_start.saturating_sub(LOWEST).max(1);
    // Each process starts at its own offset; ports it tried are not tried again.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.subsec_nanos()))
            % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let candidate = LOWEST + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let Ok(port) = u16::try_from(candidate) else {
            continue;
        };
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().expect("local address");
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

/// YAML 1.1 (Kubernetes) reads `0400` as octal; a YAML 1.2 reader gives 400.
fn file_mode(value: Option<&Value>, default: u32) -> u32 {
    let Some(number) = value.and_then(Value::as_u64) else {
        return default;
    };
    let number = u32::try_from(number).unwrap_or(default);
    if number > 0o777 {
        u32::from_str_radix(&number.to_string(), 8).unwrap_or(default)
    } else {
        number
    }
}

/// A literal env value with `$(NAME)` replaced by the value of a variable defined before it,
/// as the kubelet expands it (`$$` escapes a `$`; an unknown reference stays as written).
fn expand_dependent_variables(value: &str, defined: &[(String, String)]) -> String {
    let mut expanded = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        expanded.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            expanded.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after
            .strip_prefix('(')
            .and_then(|inner| inner.split_once(')'))
            && let Some((_, found)) = defined.iter().rev().find(|(known, _)| known == name)
        {
            expanded.push_str(found);
            rest = tail;
        } else {
            expanded.push('$');
            rest = after;
        }
    }
    expanded.push_str(rest);
    expanded
}

/// The environment-variable form of a Service name (`medai-audit` → `MEDAI_AUDIT`).
pub fn service_link_name(service: &str) -> String {
    service.to_ascii_uppercase().replace('-', "_")
}

fn snapshot(directory: &Path) -> Snapshot {
    let mut entries = Vec::new();
    let mut pending = vec![directory.to_owned()];
    while let Some(current) = pending.pop() {
        let Ok(listing) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in listing.flatten() {
            let path = entry.path();
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(path.clone());
            }
            entries.push((
                path,
                metadata.len(),
                metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
    }
    entries.sort();
    entries
}

async fn proxy_connections(listener: tokio::net::TcpListener, endpoints: Endpoints, index: usize) {
    let next = AtomicUsize::new(0);
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let target = {
            let ready = endpoints.lock().expect("endpoints");
            if ready.is_empty() {
                None
            } else {
                let chosen = next.fetch_add(1, Ordering::Relaxed) % ready.len();
                Some(ready[chosen].1[index])
            }
        };
        // No ready endpoint: the connection is refused, as kube-proxy rejects it.
        let Some(target) = target else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                let _ = outbound.set_nodelay(true);
                let _ = inbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

impl LocalCluster {
    /// Creates the Services of `manifests` (a local proxy for each ClusterIP/LoadBalancer
    /// Service port) and keeps the rest for [`LocalCluster::start_deployment`].
    pub async fn new(namespace: &str, manifests: Vec<Value>, objects: ClusterObjects) -> Self {
        let mut services = Vec::new();
        for manifest in manifests
            .iter()
            .filter(|manifest| text(manifest, "/kind").as_deref() == Some("Service"))
        {
            let name = text(manifest, "/metadata/name").expect("Service name");
            // Headless: DNS names the pods themselves and Kubernetes gives no service links.
            // A process here cannot be handed a name that resolves to several pods (each pod
            // is 127.0.0.1 with ports of its own), so the name stands for one address: the
            // proxy, spreading connections over the ready pods. Balancing across the addresses
            // of one name is proven by libs/runtime's balance tests.
            let headless = text(manifest, "/spec/clusterIP").as_deref() == Some("None");
            let endpoints = Arc::new(Mutex::new(Vec::new()));
            let mut ports = Vec::new();
            let mut proxies = Vec::new();
            let declared = manifest
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (index, port) in declared.iter().enumerate() {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind a Service proxy");
                let local = listener.local_addr().expect("proxy address");
                proxies.push(tokio::spawn(proxy_connections(
                    listener,
                    endpoints.clone(),
                    index,
                )));
                let number = port.pointer("/port").and_then(Value::as_u64).expect("port");
                ports.push(ServicePort {
                    port: u16::try_from(number).expect("port number"),
                    name: text(port, "/name"),
                    target: port
                        .pointer("/targetPort")
                        .cloned()
                        .unwrap_or_else(|| Value::from(number)),
                    local,
                });
            }
            services.push(ClusterService {
                name,
                headless,
                selector: labels(manifest.pointer("/spec/selector")),
                ports,
                endpoints,
                proxies,
            });
        }
        Self {
            namespace: namespace.to_owned(),
            manifests,
            objects,
            root: tempfile::tempdir().expect("cluster root"),
            services,
            pods: Vec::new(),
            started: AtomicUsize::new(0),
        }
    }

    pub fn manifests(&self) -> &[Value] {
        &self.manifests
    }

    /// Objects of `kind`.
    pub fn objects_of(&self, kind: &str) -> Vec<&Value> {
        self.manifests
            .iter()
            .filter(|manifest| text(manifest, "/kind").as_deref() == Some(kind))
            .collect()
    }

    fn deployment(&self, name: &str) -> &Value {
        self.objects_of("Deployment")
            .into_iter()
            .find(|manifest| text(manifest, "/metadata/name").as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Deployment {name} in the chart"))
    }

    pub fn deployment_names(&self) -> Vec<String> {
        self.objects_of("Deployment")
            .iter()
            .filter_map(|manifest| text(manifest, "/metadata/name"))
            .collect()
    }

    /// The address a client in the cluster reaches for `service:port` (its "ClusterIP").
    pub fn service_address(&self, service: &str, port: u16) -> SocketAddr {
        self.services
            .iter()
            .find(|candidate| candidate.name == service)
            .and_then(|candidate| candidate.ports.iter().find(|p| p.port == port))
            .map(|p| p.local)
            .unwrap_or_else(|| panic!("no Service {service} with port {port}"))
    }

    /// Names of the pods currently behind `service`.
    pub fn endpoints(&self, service: &str) -> Vec<String> {
        self.services
            .iter()
            .find(|candidate| candidate.name == service)
            .map(|candidate| {
                candidate
                    .endpoints
                    .lock()
                    .expect("endpoints")
                    .iter()
                    .map(|(pod, _)| pod.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The service-link variables Kubernetes gives a pod for every Service of the namespace.
    fn service_links(&self) -> Vec<(String, String)> {
        let mut links = Vec::new();
        for service in self.services.iter().filter(|service| !service.headless) {
            let Some(first) = service.ports.first() else {
                continue;
            };
            let name = service_link_name(&service.name);
            let host = first.local.ip().to_string();
            links.push((format!("{name}_SERVICE_HOST"), host.clone()));
            links.push((
                format!("{name}_SERVICE_PORT"),
                first.local.port().to_string(),
            ));
            links.push((format!("{name}_PORT"), format!("tcp://{}", first.local)));
            for port in &service.ports {
                if let Some(port_name) = &port.name {
                    links.push((
                        format!("{name}_SERVICE_PORT_{}", service_link_name(port_name)),
                        port.local.port().to_string(),
                    ));
                }
                let base = format!("{name}_PORT_{}_TCP", port.port);
                links.push((base.clone(), format!("tcp://{}", port.local)));
                links.push((format!("{base}_PROTO"), "tcp".to_owned()));
                links.push((format!("{base}_PORT"), port.local.port().to_string()));
                links.push((format!("{base}_ADDR"), host.clone()));
            }
        }
        links
    }

    /// Starts every replica of `deployment` and waits until each is ready.
    pub async fn start_deployment(&mut self, deployment: &str, timeout: Duration) {
        let replicas = self
            .deployment(deployment)
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        let mut started = Vec::new();
        for _ in 0..replicas {
            started.push(self.start_pod_of(deployment));
        }
        for index in started {
            self.wait_ready(index, timeout).await;
        }
    }

    /// Starts the pods of every Deployment at once, as `helm install` does, then waits until
    /// all are ready.
    pub async fn start_all(&mut self, timeout: Duration) {
        let mut started = Vec::new();
        for deployment in self.deployment_names() {
            let replicas = self
                .deployment(&deployment)
                .pointer("/spec/replicas")
                .and_then(Value::as_u64)
                .unwrap_or(1);
            for _ in 0..replicas {
                started.push(self.start_pod_of(&deployment));
            }
        }
        for index in started {
            self.wait_ready(index, timeout).await;
        }
    }

    fn start_pod_of(&mut self, deployment: &str) -> usize {
        let template = self
            .deployment(deployment)
            .pointer("/spec/template")
            .cloned()
            .expect("pod template");
        let number = self.started.fetch_add(1, Ordering::Relaxed);
        let name = format!("{deployment}-{number}");
        let pod = self.spawn_pod(&name, deployment, &template);
        self.pods.push(pod);
        self.pods.len() - 1
    }

    /// Lays out the pod's volumes, builds its environment and starts its container.
    fn spawn_pod(&self, name: &str, owner: &str, template: &Value) -> Pod {
        let spec = template.pointer("/spec").cloned().expect("pod spec");
        let pod_labels = labels(template.pointer("/metadata/labels"));
        assert!(
            spec.pointer("/initContainers").is_none(),
            "init containers are not simulated"
        );
        let containers = spec
            .pointer("/containers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        assert_eq!(containers.len(), 1, "pod {name}: one container expected");
        let container = &containers[0];

        let pod_dir = self.root.path().join(name);
        let root = pod_dir.join("root");
        std::fs::create_dir_all(&root).expect("pod root");

        // Volumes at their mount paths, parents before children (a mount inside a mount).
        let volumes: BTreeMap<String, Value> = spec
            .pointer("/volumes")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .map(|volume| (text(volume, "/name").expect("volume name"), volume.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut mounts: Vec<Value> = container
            .pointer("/volumeMounts")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        mounts.sort_by_key(|mount| text(mount, "/mountPath").unwrap_or_default().len());
        let mut read_only = Vec::new();
        let mut mount_points = Vec::new();
        for mount in &mounts {
            let mount_path = text(mount, "/mountPath").expect("mountPath");
            assert!(
                mount.pointer("/subPath").is_none(),
                "subPath is not simulated"
            );
            let volume_name = text(mount, "/name").expect("mount name");
            let volume = volumes
                .get(&volume_name)
                .unwrap_or_else(|| panic!("pod {name}: no volume {volume_name}"));
            let local = root.join(mount_path.trim_start_matches('/'));
            std::fs::create_dir_all(local.parent().expect("parent")).expect("mount parent");
            let mounted_at = self.materialise_volume(name, volume, &local);
            mount_points.push(local.clone());
            if mount.pointer("/readOnly").and_then(Value::as_bool) == Some(true) {
                read_only.push((mounted_at.clone(), snapshot(&mounted_at)));
            }
        }

        let ports: Vec<(Option<String>, u16, SocketAddr)> = container
            .pointer("/ports")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .map(|port| {
                        let number = port
                            .pointer("/containerPort")
                            .and_then(Value::as_u64)
                            .expect("containerPort");
                        (
                            text(port, "/name"),
                            u16::try_from(number).expect("port"),
                            free_local_port(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();

        let rewrite = |value: &str| self.localise(value, &root, &ports);
        let mut environment = vec![
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("HOSTNAME".to_owned(), name.to_owned()),
        ];
        if spec.pointer("/enableServiceLinks").and_then(Value::as_bool) != Some(false) {
            environment.extend(self.service_links());
        }
        for entry in container
            .pointer("/env")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            let variable = text(&entry, "/name").expect("env name");
            let mut value = self.env_value(name, container, &entry);
            if entry.pointer("/value").is_some() {
                value = expand_dependent_variables(&value, &environment);
            }
            environment.retain(|(existing, _)| *existing != variable);
            environment.push((variable, rewrite(&value)));
        }

        let command: Vec<String> = container
            .pointer("/command")
            .and_then(Value::as_array)
            .expect("the chart names each container's command (the image's entrypoint)")
            .iter()
            .chain(
                container
                    .pointer("/args")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            )
            .map(|part| rewrite(part.as_str().expect("command text")))
            .collect();

        let log = pod_dir.join("log");
        let child = start_container(name, &command, &environment, &root, &log);
        Pod {
            name: name.to_owned(),
            owner: owner.to_owned(),
            labels: pod_labels,
            spec,
            child,
            ports,
            environment,
            command,
            root,
            log,
            restarts: 0,
            read_only,
            mount_points,
        }
    }

    /// Writes a volume's content at `local` (or links it there) and returns the folder that
    /// holds it.
    fn materialise_volume(&self, pod: &str, volume: &Value, local: &Path) -> PathBuf {
        if let Some(secret) = volume.pointer("/secret") {
            let secret_name = text(secret, "/secretName").expect("secretName");
            let data = self
                .objects
                .secrets
                .get(&secret_name)
                .unwrap_or_else(|| panic!("pod {pod}: Secret {secret_name} does not exist"));
            let mode = file_mode(secret.pointer("/defaultMode"), 0o644);
            std::fs::create_dir_all(local).expect("secret volume");
            let items: Vec<(String, String, u32)> =
                match secret.pointer("/items").and_then(Value::as_array) {
                    Some(items) => items
                        .iter()
                        .map(|item| {
                            (
                                text(item, "/key").expect("item key"),
                                text(item, "/path").expect("item path"),
                                file_mode(item.pointer("/mode"), mode),
                            )
                        })
                        .collect(),
                    None => data
                        .keys()
                        .map(|key| (key.clone(), key.clone(), mode))
                        .collect(),
                };
            for (key, path, file_mode) in items {
                let bytes = data
                    .get(&key)
                    .unwrap_or_else(|| panic!("pod {pod}: Secret {secret_name} has no key {key}"));
                let file = local.join(path);
                std::fs::write(&file, bytes).expect("secret file");
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(file_mode))
                    .expect("secret file mode");
            }
            return local.to_owned();
        }
        if volume.pointer("/emptyDir").is_some() {
            std::fs::create_dir_all(local).expect("emptyDir");
            return local.to_owned();
        }
        if let Some(claim) = volume.pointer("/persistentVolumeClaim") {
            let claim_name = text(claim, "/claimName").expect("claimName");
            let source = self
                .objects
                .claims
                .get(&claim_name)
                .unwrap_or_else(|| panic!("pod {pod}: no volume bound to claim {claim_name}"));
            std::os::unix::fs::symlink(source, local).expect("claim mount");
            return source.clone();
        }
        if let Some(config_map) = volume.pointer("/configMap") {
            let map_name = text(config_map, "/name").expect("configMap name");
            let data = self
                .objects
                .config_maps
                .get(&map_name)
                .unwrap_or_else(|| panic!("pod {pod}: ConfigMap {map_name} does not exist"));
            std::fs::create_dir_all(local).expect("configMap volume");
            for (key, value) in data {
                std::fs::write(local.join(key), value).expect("configMap file");
            }
            return local.to_owned();
        }
        panic!("pod {pod}: volume kind not simulated: {volume}");
    }

    fn env_value(&self, pod: &str, container: &Value, entry: &Value) -> String {
        if let Some(value) = entry.pointer("/value") {
            return value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
        }
        let Some(source) = entry.pointer("/valueFrom") else {
            return String::new();
        };
        if let Some(reference) = source.pointer("/secretKeyRef") {
            let secret = text(reference, "/name").expect("secret name");
            let key = text(reference, "/key").expect("secret key");
            let bytes = self
                .objects
                .secrets
                .get(&secret)
                .and_then(|data| data.get(&key))
                .unwrap_or_else(|| {
                    panic!(
                        "pod {pod}: CreateContainerConfigError: Secret {secret} key {key} not found"
                    )
                });
            return String::from_utf8(bytes.clone()).expect("UTF-8 Secret value");
        }
        if let Some(reference) = source.pointer("/configMapKeyRef") {
            let map = text(reference, "/name").expect("configMap name");
            let key = text(reference, "/key").expect("configMap key");
            return self
                .objects
                .config_maps
                .get(&map)
                .and_then(|data| data.get(&key))
                .cloned()
                .unwrap_or_else(|| {
                    panic!(
                        "pod {pod}: CreateContainerConfigError: ConfigMap {map} key {key} not found"
                    )
                });
        }
        if let Some(field) = text(source, "/fieldRef/fieldPath") {
            return match field.as_str() {
                "metadata.name" => pod.to_owned(),
                "metadata.namespace" => self.namespace.clone(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".to_owned(),
                other => panic!("fieldRef {other} is not simulated"),
            };
        }
        if let Some(reference) = source.pointer("/resourceFieldRef") {
            return resource_field(pod, container, reference);
        }
        panic!("pod {pod}: env source not simulated: {source}");
    }

    /// Rewrites what the pod's network and filesystem namespaces would resolve: its own ports,
    /// Service names, files of the image and paths under its mounts.
    fn localise(
        &self,
        value: &str,
        root: &Path,
        ports: &[(Option<String>, u16, SocketAddr)],
    ) -> String {
        let mut value = value.to_owned();
        for (_, container_port, local) in ports {
            value = value.replace(&format!("0.0.0.0:{container_port}"), &local.to_string());
        }
        for service in &self.services {
            for port in &service.ports {
                for host in [
                    service.name.clone(),
                    format!("{}.{}", service.name, self.namespace),
                    format!("{}.{}.svc", service.name, self.namespace),
                    format!("{}.{}.svc.cluster.local", service.name, self.namespace),
                ] {
                    value = value.replace(
                        &format!("//{host}:{}", port.port),
                        &format!("//{}", port.local),
                    );
                }
            }
        }
        if let Some(local) = self.objects.image_files.get(&value) {
            return local.display().to_string();
        }
        // A SQLite URL names a file by its absolute path: inside the pod's root too.
        if let Some(path) = value.strip_prefix("sqlite://")
            && path.starts_with('/')
        {
            return format!(
                "sqlite://{}",
                root.join(path.trim_start_matches('/')).display()
            );
        }
        // An absolute path, alone or after `--flag=`: inside the pod's root.
        let (head, path) = match value.split_once('=') {
            Some((flag, path)) if flag.starts_with('-') => (format!("{flag}="), path.to_owned()),
            _ => (String::new(), value.clone()),
        };
        if let Some(local) = self.objects.image_files.get(&path) {
            return format!("{head}{}", local.display());
        }
        if path.starts_with('/') && !path.starts_with("//") {
            return format!(
                "{head}{}",
                root.join(path.trim_start_matches('/')).display()
            );
        }
        value
    }

    /// Runs a probe the way the kubelet does; true when it passes.
    async fn probe_passes(&self, pod: &Pod, probe: &Value) -> bool {
        let timeout = Duration::from_secs(
            probe
                .pointer("/timeoutSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(1),
        );
        if let Some(command) = probe.pointer("/exec/command").and_then(Value::as_array) {
            let parts: Vec<String> = command
                .iter()
                .map(|part| self.localise(part.as_str().unwrap_or_default(), &pod.root, &pod.ports))
                .collect();
            let run = Command::new(&parts[0])
                .args(&parts[1..])
                .env_clear()
                .envs(pod.environment.iter().cloned())
                .current_dir(&pod.root)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status();
            return matches!(tokio::time::timeout(timeout, run).await, Ok(Ok(status)) if status.success());
        }
        if let Some(get) = probe.pointer("/httpGet") {
            let path = text(get, "/path").unwrap_or_else(|| "/".to_owned());
            let address = match get.pointer("/port") {
                Some(Value::String(name)) => pod.port(name),
                Some(number) => {
                    let number = number.as_u64().unwrap_or_default();
                    pod.ports
                        .iter()
                        .find(|(_, port, _)| u64::from(*port) == number)
                        .map(|(_, _, local)| *local)
                        .expect("probe port")
                }
                None => panic!("httpGet probe without a port"),
            };
            let answer = tokio::time::timeout(timeout, http_status(address, &path)).await;
            return matches!(answer, Ok(Some(status)) if (200..400).contains(&status));
        }
        if let Some(socket) = probe.pointer("/tcpSocket") {
            // The kubelet's TCP probe: the port accepts a connection.
            let address = match socket.pointer("/port") {
                Some(Value::String(name)) => pod.port(name),
                Some(number) => {
                    let number = number.as_u64().unwrap_or_default();
                    pod.ports
                        .iter()
                        .find(|(_, port, _)| u64::from(*port) == number)
                        .map(|(_, _, local)| *local)
                        .expect("probe port")
                }
                None => panic!("tcpSocket probe without a port"),
            };
            let connected =
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await;
            return matches!(connected, Ok(Ok(_)));
        }
        panic!("probe kind not simulated: {probe}");
    }

    /// Waits until the pod's startup and readiness probes pass, then adds it to the endpoints
    /// of every Service that selects it. A container that exits first is restarted, as
    /// `restartPolicy: Always` does (counted in `restarts`, after a back-off); one that keeps
    /// exiting (CrashLoopBackOff) fails the test with its log.
    pub async fn wait_ready(&mut self, index: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let container = self.pods[index]
            .spec
            .pointer("/containers/0")
            .cloned()
            .expect("container");
        let mut started = container.pointer("/startupProbe").is_none();
        loop {
            if let Some(status) = self.pods[index].child.try_wait().expect("pod status") {
                let pod = &mut self.pods[index];
                assert!(
                    pod.restarts < MAX_RESTARTS,
                    "pod {} exited ({status}) before it was ready, {} times (CrashLoopBackOff); its log ends:\n{}",
                    pod.name,
                    pod.restarts + 1,
                    pod.log_tail()
                );
                pod.restarts += 1;
                eprintln!(
                    "pod {} exited ({status}) before it was ready; restarting it",
                    pod.name
                );
                tokio::time::sleep(RESTART_BACK_OFF).await;
                pod.child = start_container(
                    &pod.name,
                    &pod.command,
                    &pod.environment,
                    &pod.root,
                    &pod.log,
                );
                started = container.pointer("/startupProbe").is_none();
                continue;
            }
            if !started {
                started = self
                    .probe_passes(
                        &self.pods[index],
                        container.pointer("/startupProbe").expect("probe"),
                    )
                    .await;
            }
            let ready = started
                && match container.pointer("/readinessProbe") {
                    Some(probe) => self.probe_passes(&self.pods[index], probe).await,
                    None => true,
                };
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pod {} was not ready within {timeout:?}; its log ends:\n{}",
                self.pods[index].name,
                self.pods[index].log_tail()
            );
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        let pod = &self.pods[index];
        for service in &self.services {
            let selected = !service.selector.is_empty()
                && service
                    .selector
                    .iter()
                    .all(|(key, value)| pod.labels.get(key) == Some(value));
            if !selected {
                continue;
            }
            let addresses: Vec<SocketAddr> = service
                .ports
                .iter()
                .map(|port| match &port.target {
                    Value::String(name) => pod.port(name),
                    number => pod
                        .ports
                        .iter()
                        .find(|(_, container_port, _)| {
                            Some(u64::from(*container_port)) == number.as_u64()
                        })
                        .map(|(_, _, local)| *local)
                        .expect("targetPort"),
                })
                .collect();
            service
                .endpoints
                .lock()
                .expect("endpoints")
                .push((pod.name.clone(), addresses));
        }
    }

    /// Terminates a pod as the kubelet does: out of every Service's endpoints, the preStop
    /// hook, SIGTERM, and SIGKILL once `terminationGracePeriodSeconds` have passed. Returns how
    /// the process ended and whether it had to be killed.
    pub async fn terminate(&mut self, index: usize) -> (ExitStatus, bool) {
        let name = self.pods[index].name.clone();
        for service in &self.services {
            service
                .endpoints
                .lock()
                .expect("endpoints")
                .retain(|(pod, _)| *pod != name);
        }
        let spec = self.pods[index].spec.clone();
        if let Some(seconds) = spec
            .pointer("/containers/0/lifecycle/preStop/sleep/seconds")
            .and_then(Value::as_u64)
        {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
        }
        if let Some(command) = spec
            .pointer("/containers/0/lifecycle/preStop/exec/command")
            .and_then(Value::as_array)
        {
            let pod = &self.pods[index];
            let parts: Vec<String> = command
                .iter()
                .map(|part| self.localise(part.as_str().unwrap_or_default(), &pod.root, &pod.ports))
                .collect();
            let _ = Command::new(&parts[0])
                .args(&parts[1..])
                .env_clear()
                .envs(pod.environment.iter().cloned())
                .current_dir(&pod.root)
                .status()
                .await;
        }
        let grace = Duration::from_secs(
            spec.pointer("/terminationGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30),
        );
        let pod = &mut self.pods[index];
        if let Some(pid) = pod.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(grace, pod.child.wait()).await {
            Ok(status) => (status.expect("pod exit"), false),
            Err(_) => {
                let _ = pod.child.kill().await;
                (pod.child.wait().await.expect("pod exit"), true)
            }
        }
    }

    /// Replaces every pod of `deployment`, one at a time, as its RollingUpdate strategy
    /// (maxSurge 1, maxUnavailable 0) does: a new pod is ready before an old one terminates.
    /// Returns each old pod's exit and whether it needed SIGKILL.
    pub async fn rolling_restart(
        &mut self,
        deployment: &str,
        timeout: Duration,
    ) -> Vec<(String, ExitStatus, bool)> {
        let strategy = self
            .deployment(deployment)
            .pointer("/spec/strategy/rollingUpdate/maxUnavailable")
            .cloned();
        assert_eq!(
            strategy,
            Some(Value::from(0)),
            "Deployment {deployment}: a rollout must never take a ready pod away first"
        );
        let old: Vec<String> = self
            .pods
            .iter()
            .filter(|pod| pod.owner == deployment && pod.child.id().is_some())
            .map(|pod| pod.name.clone())
            .collect();
        let mut ended = Vec::new();
        for old_name in old {
            let new = self.start_pod_of(deployment);
            self.wait_ready(new, timeout).await;
            let index = self
                .pods
                .iter()
                .position(|pod| pod.name == old_name)
                .expect("old pod");
            let (status, killed) = self.terminate(index).await;
            ended.push((old_name, status, killed));
        }
        ended
    }

    /// Starts one pod of `deployment` and returns its index, without waiting for it.
    pub fn start_pod(&mut self, deployment: &str) -> usize {
        self.start_pod_of(deployment)
    }

    /// Waits up to `timeout` for the pod's container to exit, without restarting it; None
    /// while it still runs.
    pub async fn wait_exit(&mut self, index: usize, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.pods[index].child.wait())
            .await
            .ok()
            .map(|status| status.expect("pod exit"))
    }

    /// Fails the test at once, with the pod's log, when a running pod's container has exited
    /// since it was started: a test polling for what the mesh should do would otherwise spin
    /// to its own deadline after a panic and report only that nothing happened.
    pub fn assert_no_pod_exited(&mut self) {
        for pod in &mut self.pods {
            if pod.child.id().is_none() {
                continue;
            }
            if let Some(status) = pod.child.try_wait().expect("pod status") {
                panic!(
                    "pod {} exited ({status}) while the test ran; its log ends:\n{}",
                    pod.name,
                    pod.log_tail()
                );
            }
        }
    }

    /// Whether the pod's readiness probe passes now, run as the kubelet runs it.
    pub async fn readiness_passes(&self, index: usize) -> bool {
        let probe = self.pods[index]
            .spec
            .pointer("/containers/0/readinessProbe")
            .cloned()
            .expect("a readiness probe");
        self.probe_passes(&self.pods[index], &probe).await
    }

    /// `helm install`: the chart's `pre-install` hook Jobs to completion first (see
    /// [`LocalCluster::run_hook_jobs`]), then the pods of every Deployment at once.
    pub async fn install(&mut self, timeout: Duration) -> Vec<HookRun> {
        let hooks = self.run_hook_jobs("pre-install", timeout).await;
        self.start_all(timeout).await;
        hooks
    }

    /// Runs the chart's hook Jobs for `event` (`pre-install`, `pre-upgrade`) as Helm does: in
    /// the order of `helm.sh/hook-weight`, then name, one at a time, each to completion. A pod
    /// that fails is replaced until the Job's `backoffLimit` is spent (as the Job controller
    /// does); a Job that does not complete within `activeDeadlineSeconds` (at most `timeout`)
    /// fails the test with its log, as it fails `helm install`.
    pub async fn run_hook_jobs(&mut self, event: &str, timeout: Duration) -> Vec<HookRun> {
        let mut jobs: Vec<(i64, String, Value)> = self
            .objects_of("Job")
            .into_iter()
            .filter(|job| {
                text(job, "/metadata/annotations/helm.sh~1hook")
                    .is_some_and(|events| events.split(',').any(|name| name.trim() == event))
            })
            .map(|job| {
                let weight = text(job, "/metadata/annotations/helm.sh~1hook-weight")
                    .and_then(|weight| weight.trim().parse().ok())
                    .unwrap_or(0);
                (
                    weight,
                    text(job, "/metadata/name").expect("Job name"),
                    job.clone(),
                )
            })
            .collect();
        jobs.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut runs = Vec::new();
        for (_, job_name, job) in jobs {
            let template = job
                .pointer("/spec/template")
                .cloned()
                .expect("Job template");
            assert_eq!(
                text(&template, "/spec/restartPolicy").as_deref(),
                Some("Never"),
                "Job {job_name}: a hook pod is replaced, not restarted in place"
            );
            let backoff_limit = job
                .pointer("/spec/backoffLimit")
                .and_then(Value::as_u64)
                .unwrap_or(6);
            let deadline = job
                .pointer("/spec/activeDeadlineSeconds")
                .and_then(Value::as_u64)
                .map_or(timeout, |seconds| timeout.min(Duration::from_secs(seconds)));
            let began = Instant::now();
            let mut attempts = Vec::new();
            loop {
                let number = self.started.fetch_add(1, Ordering::Relaxed);
                let pod_name = format!("{job_name}-{number}");
                let mut pod = self.spawn_pod(&pod_name, &job_name, &template);
                let left = deadline.saturating_sub(began.elapsed());
                let status = match tokio::time::timeout(left, pod.child.wait()).await {
                    Ok(status) => status.expect("hook pod exit"),
                    Err(_) => {
                        let _ = pod.child.kill().await;
                        panic!(
                            "hook Job {job_name} did not complete within {deadline:?}; its log ends:\n{}",
                            pod.log_tail()
                        );
                    }
                };
                let log = std::fs::read_to_string(&pod.log).unwrap_or_default();
                self.pods.push(pod);
                attempts.push(status);
                if status.success() {
                    runs.push(HookRun {
                        job: job_name.clone(),
                        attempts,
                        log,
                    });
                    break;
                }
                assert!(
                    (attempts.len() as u64) <= backoff_limit,
                    "hook Job {job_name} failed (BackoffLimitExceeded after {} pods); the last log:\n{log}",
                    attempts.len()
                );
            }
        }
        runs
    }

    /// Runs a bare Pod (a `helm test` hook) to completion; returns its exit and log.
    pub async fn run_pod(&mut self, manifest: &Value, timeout: Duration) -> (ExitStatus, String) {
        let name = text(manifest, "/metadata/name").expect("pod name");
        let mut pod = self.spawn_pod(&name, "", manifest);
        let status = tokio::time::timeout(timeout, pod.child.wait())
            .await
            .unwrap_or_else(|_| panic!("pod {name} did not finish within {timeout:?}"))
            .expect("pod exit");
        let log = std::fs::read_to_string(&pod.log).unwrap_or_default();
        self.pods.push(pod);
        (status, log)
    }

    /// Nothing changed under a read-only mount, and nothing was written to any pod's root
    /// filesystem outside its mounts (both read-only in the chart).
    pub fn assert_read_only_respected(&self) {
        for pod in &self.pods {
            for (folder, before) in &pod.read_only {
                assert_eq!(
                    &snapshot(folder),
                    before,
                    "pod {} changed its read-only mount {}",
                    pod.name,
                    folder.display()
                );
            }
            let written: Vec<PathBuf> = snapshot(&pod.root)
                .into_iter()
                .map(|(path, _, _)| path)
                .filter(|path| {
                    !pod.mount_points
                        .iter()
                        .any(|mount| path.starts_with(mount) || mount.starts_with(path))
                })
                .collect();
            assert!(
                written.is_empty(),
                "pod {} wrote to its read-only root filesystem: {written:?}",
                pod.name
            );
        }
    }

    /// Stops every pod still running (SIGTERM, then SIGKILL).
    pub async fn stop(mut self) {
        let running: Vec<usize> = (0..self.pods.len())
            .filter(|index| self.pods[*index].child.id().is_some())
            .collect();
        for index in running.into_iter().rev() {
            let pod = &mut self.pods[index];
            if let Some(pid) = pod.child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(10), pod.child.wait())
                .await
                .is_err()
            {
                let _ = pod.child.kill().await;
            }
        }
        for service in &self.services {
            for proxy in &service.proxies {
                proxy.abort();
            }
        }
    }
}

/// Starts (or restarts) a pod's container; its output is appended to the pod's log.
fn start_container(
    pod: &str,
    command: &[String],
    environment: &[(String, String)],
    root: &Path,
    log: &Path,
) -> Child {
    let output = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("pod log");
    Command::new(&command[0])
        .args(&command[1..])
        .env_clear()
        .envs(environment.iter().cloned())
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .stdout(output.try_clone().expect("log"))
        .stderr(output)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("pod {pod}: cannot start {}: {error}", command[0]))
}

/// The status code of a plain HTTP/1.1 GET, or None when the connection fails.
async fn http_status(address: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let head = String::from_utf8_lossy(&response);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// A `resourceFieldRef` as the kubelet resolves it for CPU: the container's request or limit
/// divided by the divisor, rounded up (`250m` with divisor `1` is `1`).
fn resource_field(pod: &str, container: &Value, reference: &Value) -> String {
    let own_name = text(container, "/name").expect("container name");
    if let Some(named) = text(reference, "/containerName") {
        assert_eq!(
            named, own_name,
            "pod {pod}: resourceFieldRef of another container is not simulated"
        );
    }
    let resource = text(reference, "/resource").expect("resourceFieldRef resource");
    let (kind, name) = resource
        .split_once('.')
        .unwrap_or_else(|| panic!("pod {pod}: resource {resource}"));
    assert_eq!(
        name, "cpu",
        "pod {pod}: only CPU resourceFieldRefs are simulated"
    );
    let quantity = container
        .pointer(&format!("/resources/{kind}/cpu"))
        .map(|value| {
            value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned)
        })
        .unwrap_or_else(|| panic!("pod {pod}: {resource} is not set"));
    let divisor = text(reference, "/divisor").unwrap_or_else(|| "1".to_owned());
    cpu_millis(&quantity)
        .div_ceil(cpu_millis(&divisor))
        .to_string()
}

/// A CPU quantity (`250m`, `2`, `1.5`) in millicores.
fn cpu_millis(quantity: &str) -> u64 {
    match quantity.strip_suffix('m') {
        Some(millis) => millis.parse().expect("a CPU quantity in millicores"),
        None => {
            let cores: f64 = quantity.parse().expect("a CPU quantity");
            (cores * 1000.0).round() as u64
        }
    }
}

#[cfg(test)]
mod resource_field_tests {
    use super::*;

    #[test]
    fn cpu_requests_round_up_to_whole_divisors_as_the_kubelet_gives_them() {
        let container = serde_json::json!({
            "name": "gateway",
            "resources": { "requests": { "cpu": "250m" }, "limits": { "cpu": 3 } }
        });
        let reference = |resource: &str, divisor: &str| serde_json::json!({ "containerName": "gateway", "resource": resource, "divisor": divisor });
        assert_eq!(
            resource_field("p", &container, &reference("requests.cpu", "1")),
            "1"
        );
        assert_eq!(
            resource_field("p", &container, &reference("requests.cpu", "1m")),
            "250"
        );
        assert_eq!(
            resource_field("p", &container, &reference("limits.cpu", "1")),
            "3"
        );
        assert_eq!(cpu_millis("1.5"), 1500);
        assert_eq!(cpu_millis("2"), 2000);
    }
}
