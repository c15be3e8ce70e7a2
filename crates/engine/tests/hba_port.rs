//! SetAllPathStatusesFromHbaPort across LUNs: all-or-nothing as to reservation. When another Set call
//! is running on one LUN, the call fails with `VDS_E_ANOTHER_CALL_IN_PROGRESS` and no LUN changes —
//! it used to apply LUN by LUN, leaving the earlier LUNs changed while reporting failure.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lunmpio_engine::transport::PathTarget;
use lunmpio_engine::{
    EventLog, Lun, LunOptions, LunSettings, LunSpec, PathSpec, set_all_path_statuses_from_hba_port,
};
use lunmpio_vds::{HbaPortMatch, Hresult, PathStatus, Wwn};

const NODE: u64 = 0x2000_0000_0000_0001;
const PORT_A: u64 = 0x2100_0000_0000_000a;

/// A LUN named `name` over two links of one image file, both through HBA port A.
async fn lun(dir: &Path, name: &str, events: &Arc<EventLog>) -> Lun {
    let image = dir.join(format!("{name}.img"));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let link = dir.join(format!("{name}-b.img"));
    std::fs::hard_link(&image, &link).unwrap();
    let paths = [image, link]
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let uri = format!("file://{}", file.display());
            PathSpec {
                id: i as u64 + 1,
                name: format!("{name}-p{i}"),
                target: PathTarget::parse(&uri, None).unwrap(),
                uri,
                primary: false,
                weight: 0,
                bind: None,
                interconnect: None,
                hba_wwns: Some((Wwn::from_u64(NODE), Wwn::from_u64(PORT_A))),
                fence: None,
            }
        })
        .collect();
    let spec = LunSpec {
        name: name.into(),
        source_id: name.len() as u64,
        settings: LunSettings::default(),
        size_bytes: None,
        wwid: None,
        shared_backing: true,
        paths,
    };
    let options = LunOptions {
        state_dir: None,
        startup_timeout: Some(Duration::from_secs(5)),
        carry: None,
    };
    Lun::start(spec, options, Arc::clone(events)).await.unwrap()
}

fn statuses(lun: &Lun) -> Vec<PathStatus> {
    lun.get_path_info().iter().map(|p| p.status).collect()
}

#[tokio::test]
async fn a_set_call_running_on_one_lun_leaves_every_lun_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let events = Arc::new(EventLog::new());
    let luns = vec![
        lun(dir.path(), "a", &events).await,
        lun(dir.path(), "b", &events).await,
    ];
    let port = HbaPortMatch::Wwn {
        node: Wwn::from_u64(NODE),
        port: Wwn::from_u64(PORT_A),
    };
    let standby = PathStatus::Standby as i32;
    {
        // Another Set call holds LUN b.
        let _busy = luns[1].try_reserve_set().unwrap();
        let err = set_all_path_statuses_from_hba_port(&luns, port, standby)
            .await
            .unwrap_err();
        assert_eq!(err.hresult, Hresult::VDS_E_ANOTHER_CALL_IN_PROGRESS);
        assert_eq!(statuses(&luns[0]), [PathStatus::Online; 2], "LUN a changed");
        assert_eq!(statuses(&luns[1]), [PathStatus::Online; 2]);
        // An invalid status is refused before anything else.
        let err = set_all_path_statuses_from_hba_port(&luns, port, 0)
            .await
            .unwrap_err();
        assert_eq!(err.hresult, Hresult::E_INVALIDARG);
    }
    // Reservations are released on every path out: the call now goes through on both LUNs.
    let (hresult, outcomes) = set_all_path_statuses_from_hba_port(&luns, port, standby)
        .await
        .unwrap();
    assert_eq!(hresult, Hresult::S_OK);
    assert_eq!(outcomes.iter().map(|o| o.changed).sum::<u32>(), 4);
    for lun in &luns {
        assert_eq!(statuses(lun), [PathStatus::Standby; 2]);
        assert!(lun.try_reserve_set().is_ok(), "reservation released");
    }
}
