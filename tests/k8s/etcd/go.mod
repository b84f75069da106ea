// The lab's etcd, built from go.etcd.io/etcd/server/v3 (its root package is
// `main`); build.sh adds the requirement from versions.env.
module stillpoint.dev/lab/etcd

go 1.26.0
