// The tools the monitoring and chart tests run: prometheus and promtool
// (github.com/prometheus/prometheus) and helm (helm.sh/helm/v4), built
// from their modules by tools.sh, which adds the requirements from
// versions.env; nothing upstream is copied here.
module stillpoint.dev/lab/tools

go 1.26.0
