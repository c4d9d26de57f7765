//! The docker compose deployment (`deploy/`), for real: builds the image
//! (`deploy/build-images.sh`), starts `deploy/docker-compose.yml` under a
//! project name of its own with temporary host directories and ports, then
//! from the host: creates a node and an export with `blkmeshctl`, runs
//! verified I/O with `blkmesh-io` against the export's socket while a worker
//! container is killed (restart policy) and while one hangs (the frontend
//! fences it by pid across containers), restarts the manager and checks the
//! state came back, scrapes the metrics, and tears everything down with
//! `compose down -v`, checking that no container, network or volume of the
//! project is left. A guard tears down on failure too.
//!
//! Needs a docker engine (`docker info` must succeed) and compose (`docker
//! compose` or `docker-compose`); without them the test prints why and
//! passes. Host tools come from target/debug: `cargo build --bins` first.
//! The image build is a release build in target/deploy: minutes the first
//! time, seconds once cached.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkmesh_testkit::{run_tool_timeout, verify_load, wait_for_path};

/// The image build (a cold release build of the daemons on 2 cores takes
/// about 11 minutes; cached, seconds).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// One `compose up`, `restart` or `down`.
const COMPOSE_TIMEOUT: Duration = Duration::from_secs(180);
/// All services healthy after `up`, or one after a restart.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(90);
/// A short docker or blkmeshctl command.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// The frontend's hang detection, shortened for the test (default 5 s).
const WORKER_TIMEOUT_MS: &str = "2000";
const SERVICES: [&str; 4] = ["manager", "frontend", "worker0", "worker1"];
/// The workers' uid and gid in the compose file (BLKMESH_WORKER_UID).
const WORKER_UID: u32 = 64055;
const MIB: u64 = 1 << 20;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Runs `program args` with extra environment, capturing output; kills it
/// after `timeout` (the output then says so).
fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    env: &[(String, String)],
    timeout: Duration,
) -> Output {
    run_in(None, program, args, env, timeout)
}

/// [`run`] in directory `cwd`.
fn run_in<S: AsRef<OsStr>>(
    cwd: Option<&Path>,
    program: &str,
    args: &[S],
    env: &[(String, String)],
    timeout: Duration,
) -> Output {
    let mut cmd = Command::new(program);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = match cmd
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Output {
                status: failed_status(),
                stdout: Vec::new(),
                stderr: format!("cannot run {program}: {e}").into_bytes(),
            }
        }
    };
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().unwrap_or_else(|_| failed_status());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break failed_status(),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let mut stderr = err.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\n{program} killed after {timeout:?}\n").as_bytes());
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

fn failed_status() -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    std::process::ExitStatus::from_raw(1 << 8)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The stdout of a command that must succeed.
fn ok(what: &str, out: Output) -> String {
    assert!(out.status.success(), "{what} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run("docker", args, &[], CMD_TIMEOUT)
}

/// Why the deployment cannot be tested here, if it cannot.
fn unavailable() -> Option<String> {
    // An escape hatch for a machine whose docker cannot run it (and for
    // quick local runs): BLKMESH_SKIP_DEPLOY_TEST=1.
    if std::env::var_os("BLKMESH_SKIP_DEPLOY_TEST").is_some_and(|v| v == "1") {
        return Some("BLKMESH_SKIP_DEPLOY_TEST=1 is set".into());
    }
    let info = run("docker", &["info"], &[], Duration::from_secs(30));
    if !info.status.success() {
        return Some(format!(
            "no docker engine (`docker info` failed: {})",
            String::from_utf8_lossy(&info.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ));
    }
    None
}

/// `docker compose` if the plugin is there, else `docker-compose`.
fn compose_command() -> Option<Vec<String>> {
    let v2 = run("docker", &["compose", "version"], &[], CMD_TIMEOUT);
    if v2.status.success() {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    let v1 = run("docker-compose", &["version"], &[], CMD_TIMEOUT);
    if v1.status.success() {
        return Some(vec!["docker-compose".into()]);
    }
    None
}

/// Prints how long each step took.
struct Clock {
    start: Instant,
    step: Instant,
}

impl Clock {
    fn new() -> Self {
        Clock {
            start: Instant::now(),
            step: Instant::now(),
        }
    }

    fn lap(&mut self, what: &str) {
        let now = Instant::now();
        eprintln!(
            "deploy: {what}: {:.1} s (total {:.1} s)",
            (now - self.step).as_secs_f64(),
            (now - self.start).as_secs_f64()
        );
        self.step = now;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `memlock` value for the workers this docker daemon can set: unlimited
/// if it may raise the limit (CAP_SYS_RESOURCE), else this process's hard
/// limit (the daemon's, on a host where neither has the capability).
fn memlock(image: &str) -> String {
    let probe = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "memlock=-1:-1",
        "--entrypoint",
        "blkmesh-health",
        image,
        "--version",
    ]);
    if probe.status.success() {
        return "-1".into();
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap_or("65536")
        .to_string();
    eprintln!(
        "deploy: this docker daemon cannot raise RLIMIT_MEMLOCK (no CAP_SYS_RESOURCE): \
         workers get memlock={hard} instead of unlimited"
    );
    hard
}

/// A running compose project; `down -v` on drop unless the test did it.
struct Deployment {
    compose: Vec<String>,
    project: String,
    file: PathBuf,
    env: Vec<(String, String)>,
    api: String,
    metrics_port: u16,
    run_dir: PathBuf,
    image_dir: PathBuf,
    down: bool,
    // Last: removed after the guard's `down`.
    _dir: tempfile::TempDir,
}

impl Deployment {
    fn new(compose: Vec<String>, image: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("blkmesh-deploy-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let sub = |name: &str| {
            let p = root.join(name);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (run_dir, image_dir, state_dir, config_dir) =
            (sub("run"), sub("images"), sub("state"), sub("config"));
        // The shipped example configuration, as compose uses it by default.
        std::fs::copy(
            workspace().join("deploy/config/blkmesh.toml"),
            config_dir.join("blkmesh.toml"),
        )
        .expect("copy deploy/config/blkmesh.toml");
        let api_port = free_port();
        let metrics_port = free_port();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let project = format!("blkmesh-test-{}-{nanos}", std::process::id());
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let env = vec![
            ("BLKMESH_IMAGE".into(), image.to_string()),
            ("BLKMESH_RUN_DIR".into(), s(&run_dir)),
            ("BLKMESH_IMAGE_DIR".into(), s(&image_dir)),
            ("BLKMESH_STATE_DIR".into(), s(&state_dir)),
            ("BLKMESH_CONFIG_DIR".into(), s(&config_dir)),
            ("BLKMESH_API_PORT".into(), api_port.to_string()),
            ("BLKMESH_METRICS_PORT".into(), metrics_port.to_string()),
            ("BLKMESH_WORKER_MEMLOCK".into(), memlock(image)),
            ("BLKMESH_SECCOMP".into(), "enforce".into()),
            (
                "BLKMESH_WORKER_SECCOMP_PROFILE".into(),
                s(&workspace().join("deploy/seccomp-io_uring.json")),
            ),
            ("BLKMESH_WORKER_TIMEOUT_MS".into(), WORKER_TIMEOUT_MS.into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        Deployment {
            compose,
            project,
            file: workspace().join("deploy/docker-compose.yml"),
            env,
            api: format!("http://127.0.0.1:{api_port}"),
            metrics_port,
            run_dir,
            image_dir,
            down: false,
            _dir: dir,
        }
    }

    fn compose(&self, args: &[&str], timeout: Duration) -> Output {
        let mut all: Vec<String> = self.compose[1..].to_vec();
        all.extend([
            "-p".into(),
            self.project.clone(),
            "-f".into(),
            self.file.to_str().unwrap().into(),
        ]);
        all.extend(args.iter().map(|a| a.to_string()));
        // From deploy/, as the README says: docker-compose 1.x reads the
        // seccomp profile relative to the current directory.
        let dir = self.file.parent();
        run_in(dir, &self.compose[0], &all, &self.env, timeout)
    }

    fn label(&self) -> String {
        format!("label=com.docker.compose.project={}", self.project)
    }

    /// The container of a service (also when it has exited).
    fn container(&self, service: &str) -> String {
        let out = docker(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &self.label(),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        let id = ok("docker ps", out).trim().to_string();
        assert!(
            !id.is_empty() && !id.contains('\n'),
            "service {service}: expected one container, got {id:?}"
        );
        id
    }

    fn inspect(&self, service: &str, format: &str) -> String {
        let out = docker(&["inspect", "--format", format, &self.container(service)]);
        ok("docker inspect", out).trim().to_string()
    }

    /// `healthy`, `starting`, `unhealthy`, or the state of a container
    /// without a health check.
    fn health(&self, service: &str) -> String {
        self.inspect(
            service,
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
        )
    }

    fn restarts(&self, service: &str) -> u64 {
        self.inspect(service, "{{.RestartCount}}")
            .parse()
            .unwrap_or(0)
    }

    fn wait_healthy(&self, services: &[&str]) {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            let states: Vec<(String, String)> = services
                .iter()
                .map(|s| (s.to_string(), self.health(s)))
                .collect();
            if states.iter().all(|(_, h)| h == "healthy") {
                return;
            }
            if Instant::now() >= deadline {
                // What the failing health checks printed last.
                let why: Vec<String> = states
                    .iter()
                    .filter(|(_, h)| h != "healthy")
                    .map(|(s, _)| {
                        let last = self.inspect(
                            s,
                            "{{if .State.Health}}{{range .State.Health.Log}}{{.Output}}{{end}}{{end}}",
                        );
                        format!("{s}: {}", last.lines().last().unwrap_or(""))
                    })
                    .collect();
                panic!(
                    "services not healthy within {HEALTH_TIMEOUT:?}: {states:?}\n{}",
                    why.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// blkmeshctl from the host, through the published port.
    fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["--addr", self.api.as_str()];
        all.extend_from_slice(args);
        run_tool_timeout("blkmeshctl", all, CMD_TIMEOUT)
    }

    fn exports(&self) -> serde_json::Value {
        let out = ok("export list", self.ctl(&["--json", "export", "list"]));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("export list --json: {e}: {out}"))
    }

    /// The export's state and the workers its queues are on.
    fn export(&self, id: &str) -> Option<(String, Vec<String>)> {
        let all = self.exports();
        let list = all
            .as_array()
            .or_else(|| all.get("exports").and_then(|e| e.as_array()))?;
        let e = list.iter().find(|e| e["id"] == id)?;
        let workers = e["queues"]
            .as_array()
            .map(|q| {
                q.iter()
                    .filter_map(|q| q["worker"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Some((e["state"].as_str().unwrap_or("").to_string(), workers))
    }

    fn wait_serving(&self, id: &str) -> Vec<String> {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            let got = self.export(id);
            if let Some((state, workers)) = &got {
                if state == "SERVING" {
                    return workers.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "export {id} not serving within {HEALTH_TIMEOUT:?}: {got:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn logs(&self, service: &str) -> String {
        let out = self.compose(&["logs", "--no-color", service], CMD_TIMEOUT);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn metrics(&self) -> String {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .expect("connect to the metrics port");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    }

    fn down(&mut self) -> Output {
        self.down = true;
        self.compose(
            &["down", "-v", "--remove-orphans", "--timeout", "10"],
            COMPOSE_TIMEOUT,
        )
    }

    /// What of the project is left: containers, networks, volumes.
    fn leftovers(&self) -> String {
        let label = self.label();
        let mut left = String::new();
        for kind in [
            &["ps", "-aq"][..],
            &["network", "ls", "-q"][..],
            &["volume", "ls", "-q"][..],
        ] {
            let mut args: Vec<&str> = kind.to_vec();
            args.extend(["--filter", &label]);
            let out = docker(&args);
            left.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        left.trim().to_string()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::thread::panicking() {
            let out = self.compose(&["ps"], CMD_TIMEOUT);
            eprintln!("deploy: test failed; compose ps:\n{}", text(&out));
            let out = self.compose(&["logs", "--no-color", "--tail", "60"], CMD_TIMEOUT);
            eprintln!("deploy: logs:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        let out = self.down();
        if !out.status.success() {
            eprintln!("deploy: compose down failed: {}", text(&out));
        }
    }
}

fn assert_clean(what: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("0 errors, 0 mismatches"),
        "{what}: {}",
        text(out)
    );
    let last = stdout.lines().last().unwrap_or("");
    eprintln!("deploy: {what}: {last}");
}

/// Waits until the service's container has restarted more than `before`
/// times and is healthy again.
fn wait_restarted(d: &Deployment, service: &str, before: u64) {
    let deadline = Instant::now() + HEALTH_TIMEOUT;
    while d.restarts(service) <= before {
        assert!(
            Instant::now() < deadline,
            "{service} was not restarted within {HEALTH_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    d.wait_healthy(&[service]);
}

#[test]
fn compose_deployment_serves_survives_and_cleans_up() {
    if let Some(why) = unavailable() {
        eprintln!("deploy: SKIPPED: {why}; the docker compose deployment was not tested");
        return;
    }
    let Some(compose) = compose_command() else {
        eprintln!(
            "deploy: SKIPPED: docker engine present but neither `docker compose` nor \
             `docker-compose` works; the docker compose deployment was not tested"
        );
        return;
    };
    let mut clock = Clock::new();
    eprintln!("deploy: compose command: {}", compose.join(" "));

    // 1. The image, built from this workspace (cached after the first time).
    let image = "blkmesh/blkmesh:dev".to_string();
    let build = run(
        "bash",
        &[workspace().join("deploy/build-images.sh")],
        &[("BLKMESH_IMAGE".into(), image.clone())],
        BUILD_TIMEOUT,
    );
    let log = ok("deploy/build-images.sh", build);
    eprintln!(
        "deploy: {}",
        log.lines()
            .rfind(|l| l.starts_with("== built"))
            .unwrap_or("image built")
    );
    clock.lap("image build (deploy/build-images.sh)");

    // Docker's default seccomp profile (as of docker 25, shipped verbatim in
    // deploy/) refuses io_uring; the workers' profile allows it.
    let probe = |profile: &str| {
        docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--security-opt",
            &format!(
                "seccomp={}",
                workspace().join("deploy").join(profile).display()
            ),
            "--entrypoint",
            "blkmesh-worker",
            &image,
            "--check-io-uring",
        ])
    };
    let refused = probe("seccomp-docker-default.json");
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("io_uring: unavailable: io_uring_setup failed"),
        "{}",
        text(&refused)
    );
    let allowed = probe("seccomp-io_uring.json");
    assert!(
        allowed.status.success() && text(&allowed).contains("io_uring: available"),
        "{}",
        text(&allowed)
    );
    clock.lap("io_uring refused by docker's default profile, allowed by ours");

    // 2. Up, and healthy.
    let mut d = Deployment::new(compose, &image);
    eprintln!(
        "deploy: project {} in {}",
        d.project,
        d._dir.path().display()
    );
    ok("compose up", d.compose(&["up", "-d"], COMPOSE_TIMEOUT));
    clock.lap("compose up -d");
    d.wait_healthy(&SERVICES);
    clock.lap("all services healthy");
    let profile = d.inspect("worker0", "{{json .HostConfig.SecurityOpt}}");
    assert!(
        profile.contains("io_uring_setup") && !profile.contains("unconfined"),
        "worker0 does not run under the io_uring seccomp profile: {}",
        &profile[..profile.len().min(300)]
    );

    // 3. The example configuration's exports came up at start (its io_uring
    // node created its sparse image), and serve verified I/O.
    d.wait_serving("disk0");
    d.wait_serving("scratch");
    assert!(
        d.image_dir.join("disk0.img").exists(),
        "the configuration's disk0.img was not created"
    );
    assert_clean(
        "verify on the configured export",
        &verify_load(&d.run_dir.join("disk0.sock"), "1"),
    );
    clock.lap("configured exports serving");

    // A node and an export, from the host. The image is where the
    // manager and the workers both see it at the same path.
    let image_file = d.image_dir.join("disk.img");
    std::fs::File::create(&image_file)
        .and_then(|f| f.set_len(64 * MIB))
        .unwrap();
    // The workers' user opens it (deploy/README.md, "Users").
    std::os::unix::fs::chown(&image_file, Some(WORKER_UID), Some(WORKER_UID)).unwrap();
    ok(
        "node add-io-uring",
        d.ctl(&[
            "node",
            "add-io-uring",
            "d",
            "--path",
            "/var/lib/blkmesh/images/disk.img",
        ]),
    );
    ok(
        "export add",
        d.ctl(&[
            "export",
            "add",
            "x",
            "--node",
            "d",
            "--socket",
            "/run/blkmesh/x.sock",
            "--writable",
            "--num-queues",
            "2",
        ]),
    );
    let socket = d.run_dir.join("x.sock");
    assert!(
        wait_for_path(&socket, true, Duration::from_secs(30)),
        "{} did not appear on the host",
        socket.display()
    );
    let workers = d.wait_serving("x");
    clock.lap("node and export created");
    assert_clean("verify", &verify_load(&socket, "3"));
    clock.lap("verified I/O");

    // 4. The worker serving it is killed while I/O runs: the restart policy
    // brings it back and the frontend fails the queues over. `docker kill`
    // with SIGKILL would count as a manual stop (no restart); any other
    // signal that kills it stands for a crash.
    let victim = workers.first().expect("queues placed").clone();
    let before = d.restarts(&victim);
    let container = d.container(&victim);
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| verify_load(&socket, "8"));
        std::thread::sleep(Duration::from_secs(2));
        ok(
            "docker kill",
            docker(&["kill", "--signal", "SIGUSR1", &container]),
        );
        load.join().unwrap()
    });
    assert_clean(&format!("verify while {victim} was killed"), &out);
    wait_restarted(&d, &victim, before);
    clock.lap("worker killed under I/O, restarted, no error");

    // 5. A worker that hangs (SIGSTOP) is fenced by the frontend with
    // SIGKILL to its pid: the workers share the pod's pid namespace.
    let workers = d.wait_serving("x");
    let victim = workers.first().expect("queues placed").clone();
    let before = d.restarts(&victim);
    let container = d.container(&victim);
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| verify_load(&socket, "8"));
        std::thread::sleep(Duration::from_secs(2));
        ok(
            "docker kill -s STOP",
            docker(&["kill", "--signal", "SIGSTOP", &container]),
        );
        load.join().unwrap()
    });
    assert_clean(&format!("verify while {victim} hung"), &out);
    assert!(
        d.logs("frontend").contains("fenced"),
        "the frontend did not log fencing the hung worker"
    );
    wait_restarted(&d, &victim, before);
    clock.lap("hung worker fenced across containers, restarted, no error");

    // 6. Metrics, on the port published from the pod.
    let metrics = d.metrics();
    assert!(
        metrics.contains("blkmesh_workers{state=\"alive\"} 2")
            && metrics.contains("blkmesh_exports 3"),
        "unexpected metrics:\n{metrics}"
    );

    // 7. The manager restarts and has its state back.
    ok(
        "compose restart manager",
        d.compose(&["restart", "manager"], COMPOSE_TIMEOUT),
    );
    d.wait_healthy(&["manager"]);
    d.wait_serving("x");
    let list = ok("export list", d.ctl(&["export", "list"]));
    assert!(
        list.contains("/run/blkmesh/x.sock") && list.contains("SERVING"),
        "after the manager's restart:\n{list}"
    );
    ok("node info", d.ctl(&["node", "info", "d"]));
    // The same configuration again: reconciled, and what the API added
    // (not in the file) is kept, not pruned.
    d.wait_serving("disk0");
    let log = d.logs("manager");
    assert!(
        log.contains("node added through the API is not in the configuration; kept"),
        "the manager did not reconcile its configuration on restart:\n{log}"
    );
    d.wait_healthy(&SERVICES);
    assert_clean(
        "verify after the manager restart",
        &verify_load(&socket, "2"),
    );
    clock.lap("manager restarted, state back");

    // 8. Down, with nothing left behind.
    ok("compose down -v", d.down());
    let left = d.leftovers();
    assert!(left.is_empty(), "left behind by compose down -v: {left}");
    clock.lap("compose down -v, nothing left");
}
