//! MQTT topic layout, as pure functions:
//! - `{prefix}/jobs/{model}`: fleet-wide jobs, taken through `$share/{group}/...`;
//! - `{prefix}/{node}/jobs/{model}`: jobs for this box;
//! - `{prefix}/{node}/results/{model}`: results when a job names no reply route;
//! - `{prefix}/{node}/status`: retained online/offline status.
//!
//! A reply route may never be a topic that inferd consumes or owns (any
//! node's jobs or status): a result published there would come back as a
//! job, or overwrite a node's status.

/// The topics of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
    pub node: String,
    pub group: String,
}

impl Topics {
    /// The two subscriptions: fleet-wide jobs (shared by the group) and this node's jobs.
    pub fn subscriptions(&self) -> [String; 2] {
        [format!("$share/{}/{}/jobs/+", self.group, self.prefix), format!("{}/{}/jobs/+", self.prefix, self.node)]
    }

    /// The model a job topic addresses, or `None` if `topic` is not a job topic of this node.
    pub fn job_model<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let model =
            rest.strip_prefix("jobs/").or_else(|| rest.strip_prefix(self.node.as_str())?.strip_prefix("/jobs/"))?;
        (!model.is_empty() && !model.contains(['/', '+', '#'])).then_some(model)
    }

    /// Where results go when the job names no reply route.
    pub fn result(&self, model: &str) -> String {
        format!("{}/{}/results/{model}", self.prefix, self.node)
    }

    /// The retained status topic.
    pub fn status(&self) -> String {
        format!("{}/{}/status", self.prefix, self.node)
    }
}

impl Topics {
    /// Whether a client may name `topic` as a reply route, or why not: a plain
    /// topic (no wildcards, not `$`-reserved), and not one inferd consumes or
    /// owns — the jobs of any node or of the fleet, or any node's status.
    pub fn reply_route_refusal(&self, topic: &str) -> Option<String> {
        if topic.is_empty() || topic.len() > 1024 || topic.contains(['+', '#', '\0']) || topic.starts_with('$') {
            return Some(format!(
                "reply route '{}' is not a plain topic (empty, too long, a wildcard or $-reserved)",
                topic.chars().take(128).collect::<String>()
            ));
        }
        let rest = topic.strip_prefix(self.prefix.as_str()).and_then(|r| r.strip_prefix('/'))?;
        let levels: Vec<&str> = rest.split('/').collect();
        // Desired state (the fleet's, a group's, a node's) and reports are never a reply route either:
        // a result published there would be taken as a rollout, or overwrite a node's report.
        let consumed = levels.first() == Some(&"jobs")
            || levels.get(1) == Some(&"jobs")
            || matches!(levels.first(), Some(&"fleet") | Some(&"groups"))
            || (levels.len() == 2 && ["status", "desired", "reported"].contains(&levels[1]));
        consumed.then(|| {
            format!(
                "reply route '{topic}' is a topic inferd consumes or owns (jobs, status or desired state under '{}/'); \
                 results never go there",
                self.prefix
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics { prefix: "inferd".into(), node: "cam-box-1".into(), group: "fleet".into() }
    }

    #[test]
    fn fleet_and_node_job_topics_name_their_model() {
        let t = topics();
        assert_eq!(t.job_model("inferd/jobs/color"), Some("color"));
        assert_eq!(t.job_model("inferd/cam-box-1/jobs/color"), Some("color"));
        assert_eq!(t.job_model("inferd/other-box/jobs/color"), None);
        assert_eq!(t.job_model("inferd/jobs/"), None);
        assert_eq!(t.job_model("inferd/jobs/a/b"), None);
        assert_eq!(t.job_model("inferdx/jobs/color"), None);
        assert_eq!(t.job_model("inferd/cam-box-1/results/color"), None);
    }

    #[test]
    fn subscriptions_results_and_status_follow_the_layout() {
        let t = topics();
        assert_eq!(
            t.subscriptions(),
            ["$share/fleet/inferd/jobs/+".to_string(), "inferd/cam-box-1/jobs/+".to_string()]
        );
        assert_eq!(t.result("color"), "inferd/cam-box-1/results/color");
        assert_eq!(t.status(), "inferd/cam-box-1/status");
    }

    #[test]
    fn reply_routes_may_not_be_wildcards_reserved_or_topics_inferd_consumes() {
        let t = topics();
        for ok in ["cams/7/answers", "inferd/cam-box-1/results/color", "inferd/other/results/x", "inferdx/jobs/color"] {
            assert_eq!(t.reply_route_refusal(ok), None, "{ok}");
        }
        for refused in [
            "cams/+/answers",
            "cams/#",
            "$SYS/x",
            "",
            "inferd/jobs/color",
            "inferd/cam-box-1/jobs/color",
            "inferd/other-box/jobs/color",
            "inferd/cam-box-1/jobs/color/extra",
            "inferd/jobs",
            "inferd/cam-box-1/status",
            "inferd/other-box/status",
            "inferd/fleet/desired",
            "inferd/groups/canary/desired",
            "inferd/cam-box-1/desired",
            "inferd/other-box/reported",
        ] {
            assert!(t.reply_route_refusal(refused).is_some(), "{refused} must be refused");
        }
    }
}
