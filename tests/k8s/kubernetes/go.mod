// The lab's Kubernetes binaries: kube-apiserver, kube-controller-manager,
// the external-snapshotter's snapshot-controller and csi-snapshotter, and
// the external-provisioner's csi-provisioner, built from their modules.
// build.sh adds the requirements (from versions.env) and replaces every
// staging module k8s.io/kubernetes requires at v0.0.0, reading the list
// from k8s.io/kubernetes's own go.mod; nothing upstream is copied here.
module stillpoint.dev/lab/kubernetes

go 1.26.0
