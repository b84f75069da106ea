{{/*
The alerting rules, as a Prometheus rule file's `groups:` (the
PrometheusRule's spec; deploy/monitoring/stillpoint-rules.yaml is the same
groups for a Prometheus without the Operator).

A counter's first increment creates its series already at 1, which
increase() cannot see: rules on counters that are not created ahead (the
controller creates every known group's backups_total, freeze window and
snapshot failure series at 0) also fire on a series that is new within
their window ("unless ... offset").
*/}}
{{- define "stillpoint.ruleGroups" -}}
{{- $r := .Values.monitoring.prometheusRule -}}
{{- $url := $r.runbookBaseURL -}}
groups:
- name: stillpoint.backups
  rules:
  - alert: StillpointBackupFailed
    expr: |
      sum by (namespace, group) (increase(stillpoint_backups_total{result="failed"}[15m])) > 0
    labels:
      severity: warning
    annotations:
      summary: A backup of a consistency group failed; it holds no consistent cut.
      description: >-
        {{`{{ $value | humanize }}`}} backup(s) of group {{`{{ $labels.namespace }}/{{ $labels.group }}`}}
        failed in the last 15 minutes. Its members were thawed; the failed
        GroupBackup's status names the phase, the member and the reason.
      runbook_url: {{ $url }}#stillpointbackupfailed
  - alert: StillpointNoRecentBackup
    expr: |
      time() - max by (namespace, schedule, group) (stillpoint_schedule_last_success_timestamp_seconds)
        > {{ $r.missedIntervals }} * max by (namespace, schedule, group) (stillpoint_schedule_interval_seconds)
    labels:
      severity: critical
    annotations:
      summary: A schedule has not made a successful backup within {{ $r.missedIntervals }} of its intervals.
      description: >-
        Schedule {{`{{ $labels.namespace }}/{{ $labels.schedule }}`}} (group {{`{{ $labels.group }}`}})
        last succeeded {{`{{ $value | humanizeDuration }}`}} ago.
      runbook_url: {{ $url }}#stillpointnorecentbackup
  - alert: StillpointSnapshotCoordinationFailed
    expr: |
      sum by (namespace, group, driver, step) (increase(stillpoint_snapshot_failures_total{step!="delete"}[15m])) > 0
    labels:
      severity: warning
    annotations:
      summary: The group snapshot of a backup could not be taken or did not become ready.
      description: >-
        Group {{`{{ $labels.namespace }}/{{ $labels.group }}`}}: the {{`{{ $labels.driver }}`}} snapshotter
        failed at step {{`{{ $labels.step }}`}} in the last 15 minutes.
      runbook_url: {{ $url }}#stillpointsnapshotcoordinationfailed
  - alert: StillpointRetentionFailing
    expr: |
      sum by (namespace, schedule) (increase(stillpoint_retention_failures_total[1h])) > 0
        or sum by (namespace, schedule) (stillpoint_retention_failures_total unless stillpoint_retention_failures_total offset 1h) > 0
        or sum by (namespace, group) (increase(stillpoint_snapshot_failures_total{step="delete"}[1h])) > 0
    labels:
      severity: warning
    annotations:
      summary: Retention cannot delete expired backups or their snapshots.
      description: >-
        {{`{{ if $labels.schedule }}Schedule {{ $labels.namespace }}/{{ $labels.schedule }} could not delete a backup its retention expired{{ else }}Group {{ $labels.namespace }}/{{ $labels.group }}: deleting a backup's snapshots failed{{ end }}`}}
        in the last hour; storage keeps growing until it can.
      runbook_url: {{ $url }}#stillpointretentionfailing
- name: stillpoint.freeze
  rules:
  - alert: StillpointFreezeWindowNearBudget
    expr: |
      histogram_quantile(0.99, sum by (namespace, group, le) (rate(stillpoint_freeze_window_seconds_bucket[6h])))
        > {{ $r.freezeBudgetWarningRatio }} * max by (namespace, group) (stillpoint_freeze_budget_seconds)
    labels:
      severity: warning
    annotations:
      summary: The freeze window of a group is close to its freeze budget.
      description: >-
        The p99 freeze window of group {{`{{ $labels.namespace }}/{{ $labels.group }}`}} over 6 hours is
        {{`{{ $value | humanizeDuration }}`}}, above {{ $r.freezeBudgetWarningRatio }} of its budget; a backup
        whose window exceeds the budget fails (StillpointFreezeBudgetExceeded).
      runbook_url: {{ $url }}#stillpointfreezewindownearbudget
  - alert: StillpointFreezeBudgetExceeded
    expr: |
      sum by (namespace, group) (increase(stillpoint_backup_failures_total{reason="BudgetExceeded"}[1h])) > 0
        or sum by (namespace, group) (stillpoint_backup_failures_total{reason="BudgetExceeded"} unless stillpoint_backup_failures_total{reason="BudgetExceeded"} offset 1h) > 0
    labels:
      severity: critical
    annotations:
      summary: A backup's freeze window went over the group's freeze budget, and the backup failed.
      description: >-
        Group {{`{{ $labels.namespace }}/{{ $labels.group }}`}}: a backup was stopped and thawed because
        its freeze window would have exceeded spec.freezeBudget.
      runbook_url: {{ $url }}#stillpointfreezebudgetexceeded
  - alert: StillpointFreezeTimeout
    expr: |
      sum by (namespace, pod, step) (increase(stillpoint_agent_failures_total{cause="timeout", step=~"prepare|freeze|hold|flush|thaw|wait-for-position"}[15m])) > 0
        or sum by (namespace, pod, step) (stillpoint_agent_failures_total{cause="timeout", step=~"prepare|freeze|hold|flush|thaw|wait-for-position"} unless stillpoint_agent_failures_total offset 15m) > 0
        or label_replace(sum by (namespace, group) (increase(stillpoint_backup_failures_total{reason="AlignmentTimeout"}[15m])) > 0, "step", "wait-for-position", "", "")
        or label_replace(sum by (namespace, group) (stillpoint_backup_failures_total{reason="AlignmentTimeout"} unless stillpoint_backup_failures_total offset 15m) > 0, "step", "wait-for-position", "", "")
    labels:
      severity: warning
    annotations:
      summary: A member's freeze, flush, thaw or alignment timed out.
      description: >-
        {{`{{ if $labels.pod }}The agent of pod {{ $labels.namespace }}/{{ $labels.pod }}{{ else }}A replica of group {{ $labels.namespace }}/{{ $labels.group }}{{ end }}`}}
        timed out at {{`{{ $labels.step }}`}} in the last 15 minutes.
      runbook_url: {{ $url }}#stillpointfreezetimeout
  - alert: StillpointMemberFrozenPastLease
    expr: |
      max by (namespace, pod) (stillpoint_agent_hold_overdue_seconds) > 5
    for: 1m
    labels:
      severity: critical
    annotations:
      summary: A database is still frozen after its hold's lease ran out.
      description: >-
        The agent of pod {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} holds a freeze {{`{{ $value | humanizeDuration }}`}}
        past its lease: its thaw has not completed. The database's writes are blocked.
      runbook_url: {{ $url }}#stillpointmemberfrozenpastlease
  - alert: StillpointMemberFrozenLong
    expr: |
      max by (namespace, pod) (stillpoint_agent_frozen_seconds) > 600
    labels:
      severity: info
    annotations:
      summary: A database has been frozen for more than 10 minutes (a GroupQuiesce, most likely).
      description: >-
        Pod {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} has been frozen for {{`{{ $value | humanizeDuration }}`}}, within its lease.
      runbook_url: {{ $url }}#stillpointmemberfrozenlong
- name: stillpoint.restore
  rules:
  - alert: StillpointRestoreOrderViolation
    expr: |
      sum by (namespace, restore) (increase(stillpoint_restore_order_violations_total[1h])) > 0
        or sum by (namespace, restore) (stillpoint_restore_order_violations_total unless stillpoint_restore_order_violations_total offset 1h) > 0
    labels:
      severity: critical
    annotations:
      summary: A restore's stages were not healthy in order; later stages were held back.
      description: >-
        Restore {{`{{ $labels.namespace }}/{{ $labels.restore }}`}}: a stage was due while an earlier stage
        was not healthy, or a later stage's workload was found started early.
      runbook_url: {{ $url }}#stillpointrestoreorderviolation
- name: stillpoint.control
  rules:
  - alert: StillpointAgentRefusingController
    expr: |
      sum by (namespace, pod, cause) (increase(stillpoint_agent_tls_refusals_total{cause=~"no_client_certificate|unknown_ca|validity|identity"}[15m])) > 0
        or sum by (namespace, pod, cause) (stillpoint_agent_tls_refusals_total{cause=~"no_client_certificate|unknown_ca|validity|identity"} unless stillpoint_agent_tls_refusals_total offset 15m) > 0
    labels:
      severity: warning
    annotations:
      summary: An agent refuses TLS connections for their certificate.
      description: >-
        The agent of pod {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} refused handshakes ({{`{{ $labels.cause }}`}})
        in the last 15 minutes: the controller cannot freeze it, or something else tries to.
      runbook_url: {{ $url }}#stillpointagentrefusingcontroller
  - alert: StillpointControllerNoLeader
    expr: |
      max(stillpoint_controller_leader) < 1 or absent(stillpoint_controller_leader)
    for: 2m
    labels:
      severity: critical
    annotations:
      summary: No Stillpoint controller replica leads; no backup, schedule or quiesce runs.
      description: >-
        For 2 minutes no scraped controller replica reported stillpoint_controller_leader 1
        (or none was scraped at all).
      runbook_url: {{ $url }}#stillpointcontrollernoleader
{{- end }}
