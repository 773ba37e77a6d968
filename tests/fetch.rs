//! Named data sets fetched through `ELBO_DATA_MIRROR` from a loopback HTTP server started
//! here: a good file is fetched once, verified and cached; a corrupt or truncated one is
//! refused with both sums and leaves nothing in the cache; a valid cache needs no server; no
//! server and no cache, or `--offline`, is one line naming the file and the folder.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{assert_one_line_error, stderr};

/// What the server answers for a path: the body, and the Content-Length it announces.
type Routes = Arc<Mutex<HashMap<String, (Vec<u8>, usize)>>>;

struct Server {
    url: String,
    routes: Routes,
    requests: Arc<AtomicUsize>,
}

/// An HTTP/1.1 server on 127.0.0.1 (one connection at a time, `Connection: close`).
fn serve() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let routes: Routes = Arc::default();
    let requests = Arc::new(AtomicUsize::new(0));
    let (r, n) = (routes.clone(), requests.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            n.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let found = r.lock().unwrap().get(&path).cloned();
            let _ = match found {
                Some((body, announced)) => stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {announced}\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| stream.write_all(&body)),
                None => stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    Server {
        url,
        routes,
        requests,
    }
}

fn elbo_with(args: &[&str], cache: &Path, mirror: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .env("ELBO_DATA_DIR", cache)
        .env("ELBO_DATA_MIRROR", mirror)
        .env_remove("ELBO_OFFLINE")
        .output()
        .unwrap()
}

const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn corrupt_truncated_and_unreachable_files_leave_nothing_in_the_cache() {
    let server = serve();
    let cache = tempfile::tempdir().unwrap();
    let never = cache.path().join("never");
    let n = never.to_str().unwrap();
    let args = ["train", "vae", "--dataset", "mnist", "--out", n];
    // A valid gzip whose content is not MNIST's: both sums are named.
    let wrong = gzip(b"not the MNIST training images");
    for f in MNIST_FILES {
        server
            .routes
            .lock()
            .unwrap()
            .insert(format!("/mnist/{f}"), (wrong.clone(), wrong.len()));
    }
    let o = elbo_with(&args, cache.path(), &server.url);
    assert_one_line_error(&o, "expected");
    let err = stderr(&o);
    assert!(
        err.contains("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db")
            && err.contains("nothing was kept"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(cache.path().join("mnist"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the cache: {left:?}");
    assert!(!never.exists());
    // Truncated: the server announces more bytes than it sends.
    let body = gzip(&[0u8; 4096]);
    let cut = body[..body.len() / 2].to_vec();
    server.routes.lock().unwrap().insert(
        "/mnist/train-images-idx3-ubyte.gz".into(),
        (cut, body.len()),
    );
    let o = elbo_with(&args, cache.path(), &server.url);
    assert!(!o.status.success());
    assert!(stderr(&o).trim_end().lines().count() == 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(cache.path().join("mnist"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the cache: {left:?}");
    // No server and no cache: one line naming the file and the folder to put it in.
    let o = elbo_with(&args, cache.path(), "http://127.0.0.1:9/");
    assert_one_line_error(&o, "train-images-idx3-ubyte.gz");
    assert!(stderr(&o).contains(&cache.path().join("mnist").display().to_string()));
    let o = elbo_with(
        &[
            "--offline",
            "train",
            "vae",
            "--dataset",
            "cifar10",
            "--out",
            n,
        ],
        cache.path(),
        &server.url,
    );
    assert_one_line_error(&o, "cifar-10-binary.tar.gz");
    assert!(stderr(&o).contains("--offline"));
}

/// The real MNIST (from `../shared/data/mnist/`), served by the loopback mirror: fetched,
/// verified, trained on with a validation split; then read from the cache with no server.
#[test]
fn mnist_through_a_mirror_then_from_the_cache() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist");
    if !shared.is_dir() {
        eprintln!("skipped: {} is absent", shared.display());
        return;
    }
    let server = serve();
    for f in MNIST_FILES {
        let bytes = std::fs::read(shared.join(f)).unwrap();
        let len = bytes.len();
        server
            .routes
            .lock()
            .unwrap()
            .insert(format!("/mnist/{f}"), (bytes, len));
    }
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let args = [
        "train",
        "vae",
        "--dataset",
        "mnist",
        "--binarize",
        "dynamic",
        "--valid",
        "10000",
        "--train-limit",
        "2000",
        "--test-limit",
        "500",
        "--epochs",
        "1",
        "--out",
        run.to_str().unwrap(),
    ];
    let o = elbo_with(&args, cache.path(), &server.url);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.requests.load(Ordering::SeqCst), 4);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for split in ["train", "valid", "test"] {
        assert!(
            line[split]["neg_elbo"].as_f64().unwrap().is_finite(),
            "{split}"
        );
    }
    // The validation split is the last 10,000 of the 60,000 training digits.
    let dir = cache.path().join("mnist");
    let all = elbo::data::load_dir(&dir, elbo::data::Split::Train).unwrap();
    assert_eq!(all.len(), 60_000);
    let (rest, valid) = all.split_last(10_000, "--valid").unwrap();
    assert_eq!((rest.len(), valid.len()), (50_000, 10_000));
    // No server now: the verified cache is used as it is, without a request.
    drop(server);
    let again = out.path().join("again");
    let mut args2 = args.to_vec();
    let last = args2.len() - 1;
    args2[last] = again.to_str().unwrap();
    let o = elbo_with(&args2, cache.path(), "http://127.0.0.1:9/");
    assert!(o.status.success(), "{}", stderr(&o));
}
