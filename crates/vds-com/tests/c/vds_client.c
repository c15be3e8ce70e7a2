/*
 * vds_client.c - drives IVdsLunMpio and IVdsHwProviderPrivateMpio through their C vtables against a
 * live lunmpio daemon, checking values and HRESULTs, and frees everything as documented.
 *
 * Usage: vds_client CONTROL_SOCKET LUN_NAME
 *
 * Expected daemon (tests/c_client.rs sets it up): LUN LUN_NAME, policy round-robin, five paths:
 *   - two Fibre Channel file paths on HBA port A (20:00:00:25:b5:00:00:01 / 21:00:00:25:b5:00:00:01),
 *   - one Fibre Channel file path on HBA port B (20:00:00:25:b5:00:00:02 / 21:00:00:25:b5:00:00:02),
 *   - one iSCSI NBD path bound to 127.0.0.1 whose target does not answer (network arm, failed),
 *   - one NBD-over-Unix path whose socket does not exist (neither arm, failed).
 * After the checks against the live daemon it prints "STOP-DAEMON" and waits for a line on stdin;
 * the harness stops the daemon and answers; then every call must fail with VDS_E_OBJECT_DELETED.
 *
 * Exit status: 0 when every check passed, 1 otherwise (each failure is printed).
 */
#define COBJMACROS
#include "lunmpio_vds.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                 \
    do {                                                                 \
        if (!(cond)) {                                                   \
            failures++;                                                  \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                \
            fprintf(stderr, "\n");                                       \
        }                                                                \
    } while (0)

#define CHECK_HR(expr, expected)                                                          \
    do {                                                                                  \
        HRESULT hr_ = (expr);                                                             \
        if (hr_ != (expected)) {                                                          \
            char msg_[512];                                                               \
            lunmpio_last_error_message(msg_, sizeof msg_);                                \
            failures++;                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s = 0x%08" PRIX32 ", expected 0x%08" PRIX32 " (%s)\n", \
                    __FILE__, __LINE__, #expr, (uint32_t)hr_, (uint32_t)(expected), msg_); \
        }                                                                                 \
    } while (0)

static const VDS_WWN PORT_A_NODE = {{0x20, 0x00, 0x00, 0x25, 0xb5, 0x00, 0x00, 0x01}};
static const VDS_WWN PORT_A_PORT = {{0x21, 0x00, 0x00, 0x25, 0xb5, 0x00, 0x00, 0x01}};
static const VDS_WWN PORT_B_NODE = {{0x20, 0x00, 0x00, 0x25, 0xb5, 0x00, 0x00, 0x02}};
static const VDS_WWN PORT_B_PORT = {{0x21, 0x00, 0x00, 0x25, 0xb5, 0x00, 0x00, 0x02}};

static int guid_is_null(const GUID *g) {
    static const GUID zero;
    return memcmp(g, &zero, sizeof zero) == 0;
}

static int wwn_eq(const VDS_WWN *a, const VDS_WWN *b) {
    return memcmp(a->rguchWwn, b->rguchWwn, 8) == 0;
}

/* Frees a GetPathInfo result as documented: each embedded pointer, then the array. */
static void free_path_info(VDS_PATH_INFO *paths, LONG count) {
    for (LONG i = 0; i < count; i++) {
        /* The type selects the arm (ISCSI: pInitiatorPortalIpAddr; FIBRE_CHANNEL, SAS, PCI_RAID:
         * pHbaPortProp; others: NULL). Both arms share the storage, so either frees the block. */
        if (paths[i].type == VDS_HWT_ISCSI)
            lunmpio_task_mem_free(paths[i].pInitiatorPortalIpAddr);
        else
            lunmpio_task_mem_free(paths[i].pHbaPortProp);
    }
    lunmpio_task_mem_free(paths);
}

/* The index of the path on HBA port `node`/`port` (the `nth` one), or -1. */
static int find_hba_path(const VDS_PATH_INFO *paths, LONG count, const VDS_WWN *node,
                         const VDS_WWN *port, int nth) {
    for (LONG i = 0; i < count; i++) {
        if (paths[i].type != VDS_HWT_FIBRE_CHANNEL || paths[i].pHbaPortProp == NULL)
            continue;
        if (wwn_eq(&paths[i].pHbaPortProp->wwnNode, node) &&
            wwn_eq(&paths[i].pHbaPortProp->wwnPort, port) && nth-- == 0)
            return (int)i;
    }
    return -1;
}

static VDS_PATH_STATUS status_of(IVdsLunMpio *lun, VDS_PATH_ID id) {
    VDS_PATH_INFO *paths = NULL;
    LONG n = 0;
    VDS_PATH_STATUS status = VDS_MPS_UNKNOWN;
    CHECK_HR(lun->lpVtbl->GetPathInfo(lun, &paths, &n), S_OK);
    for (LONG i = 0; i < n; i++)
        if (paths[i].pathId.ullSourceId == id.ullSourceId && paths[i].pathId.ullPathId == id.ullPathId)
            status = paths[i].status;
    free_path_info(paths, n);
    return status;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONTROL_SOCKET LUN_NAME\n", argv[0]);
        return 2;
    }
    const char *socket = argv[1];
    const char *lun_name = argv[2];

    /* ---- opening ---- */
    IVdsLunMpio *lun = (IVdsLunMpio *)&failures; /* garbage on purpose: must be reset to NULL */
    CHECK_HR(lunmpio_open_lun(socket, lun_name, NULL), E_POINTER);
    CHECK_HR(lunmpio_open_lun(NULL, lun_name, &lun), E_POINTER);
    CHECK(lun == NULL, "out reset on failure");
    CHECK_HR(lunmpio_open_lun(socket, "no-such-lun", &lun), VDS_E_OBJECT_NOT_FOUND);
    CHECK(lun == NULL, "out reset on failure");
    {
        char msg[256];
        size_t len = lunmpio_last_error_message(msg, sizeof msg);
        CHECK(len > 0 && strstr(msg, "no-such-lun") != NULL, "message names the LUN: %s", msg);
        CHECK(lunmpio_last_error_message(NULL, 0) == len, "length query");
    }
    CHECK_HR(lunmpio_open_lun(socket, lun_name, &lun), S_OK);
    if (lun == NULL) {
        fprintf(stderr, "cannot continue without the LUN\n");
        return 1;
    }
    CHECK(lunmpio_last_error_message(NULL, 0) == 0, "no message after a success");

    /* ---- IUnknown: QueryInterface and reference counting ---- */
    {
        void *p = (void *)&failures;
        CHECK_HR(IVdsLunMpio_QueryInterface(lun, &IID_IUnknown, &p), S_OK);
        CHECK(p == (void *)lun, "IUnknown is the same object");
        p = NULL;
        CHECK_HR(lun->lpVtbl->QueryInterface(lun, &IID_IVdsLunMpio, &p), S_OK);
        CHECK(p == (void *)lun, "IVdsLunMpio is the same object");
        p = (void *)&failures;
        CHECK_HR(lun->lpVtbl->QueryInterface(lun, &IID_IVdsHwProviderPrivateMpio, &p), E_NOINTERFACE);
        CHECK(p == NULL, "*ppv is NULL after E_NOINTERFACE");
        CHECK_HR(lun->lpVtbl->QueryInterface(lun, &IID_IUnknown, NULL), E_POINTER);
        /* 1 (open) + 2 successful QIs = 3; AddRef -> 4; back down to 1. */
        CHECK(lun->lpVtbl->AddRef(lun) == 4, "AddRef returns the new count");
        CHECK(lun->lpVtbl->Release(lun) == 3, "Release returns the new count");
        CHECK(lun->lpVtbl->Release(lun) == 2, "count 2");
        CHECK(IVdsLunMpio_Release(lun) == 1, "count 1");
    }

    /* ---- GetSupportedLbPolicies ---- */
    ULONG flags = 0;
    CHECK_HR(lun->lpVtbl->GetSupportedLbPolicies(lun, NULL), E_POINTER);
    CHECK_HR(lun->lpVtbl->GetSupportedLbPolicies(lun, &flags), S_OK);
    CHECK(flags == 0x7f, "a shared-backing LUN supports every policy: 0x%" PRIX32, flags);

    /* ---- GetPathInfo ---- */
    VDS_PATH_INFO *paths = (VDS_PATH_INFO *)&failures;
    LONG npaths = -1;
    CHECK_HR(lun->lpVtbl->GetPathInfo(lun, NULL, &npaths), E_POINTER);
    CHECK(npaths == 0, "count reset");
    CHECK_HR(lun->lpVtbl->GetPathInfo(lun, &paths, NULL), E_POINTER);
    CHECK(paths == NULL, "array reset");
    CHECK_HR(IVdsLunMpio_GetPathInfo(lun, &paths, &npaths), S_OK);
    CHECK(npaths == 5 && paths != NULL, "five paths, got %" PRId32, npaths);
    if (npaths != 5 || paths == NULL) {
        fprintf(stderr, "cannot continue without the paths\n");
        return 1;
    }
    int a0 = find_hba_path(paths, npaths, &PORT_A_NODE, &PORT_A_PORT, 0);
    int a1 = find_hba_path(paths, npaths, &PORT_A_NODE, &PORT_A_PORT, 1);
    int b0 = find_hba_path(paths, npaths, &PORT_B_NODE, &PORT_B_PORT, 0);
    CHECK(a0 >= 0 && a1 >= 0 && b0 >= 0, "HBA paths found: %d %d %d", a0, a1, b0);
    CHECK(find_hba_path(paths, npaths, &PORT_A_NODE, &PORT_A_PORT, 2) < 0, "only two on port A");
    int net = -1, other = -1;
    for (LONG i = 0; i < npaths; i++) {
        const VDS_PATH_INFO *p = &paths[i];
        CHECK(p->pathId.ullSourceId == paths[0].pathId.ullSourceId, "one LUN, one source id");
        for (LONG j = 0; j < i; j++)
            CHECK(p->pathId.ullPathId > paths[j].pathId.ullPathId, "sorted by path id, unique");
        CHECK(p->type != VDS_HWT_HYBRID, "never hybrid on a path");
        if (p->type == VDS_HWT_FIBRE_CHANNEL) {
            const VDS_HBAPORT_PROP *h = p->pHbaPortProp;
            CHECK(h != NULL, "FC path has pHbaPortProp");
            if (h != NULL) {
                CHECK(!guid_is_null(&h->id) && memcmp(&h->id, &p->hbaPortId, sizeof(VDS_OBJECT_ID)) == 0,
                      "the HBA port's id is the path's hbaPortId");
                CHECK(h->type == VDS_HPT_UNKNOWN && h->status == VDS_HPS_ONLINE, "port %d/%d",
                      (int)h->type, (int)h->status);
                CHECK(h->ulPortSpeed == VDS_HSF_UNKNOWN, "speed %" PRIu32, h->ulPortSpeed);
            }
            CHECK(!guid_is_null(&p->controllerPortId) && !guid_is_null(&p->hbaPortId), "HBA arm ids");
            CHECK(p->status == VDS_MPS_ONLINE, "file path online: %d", (int)p->status);
        } else if (p->type == VDS_HWT_ISCSI) {
            net = (int)i;
            const VDS_IPADDRESS *ip = p->pInitiatorPortalIpAddr;
            CHECK(ip != NULL, "network path has pInitiatorPortalIpAddr");
            if (ip != NULL) {
                CHECK(ip->type == VDS_IPT_IPV4, "IPv4 bind address: %d", (int)ip->type);
                CHECK(ip->ipv4Address == 0x7F000001u, "127.0.0.1 as its numeric value: 0x%08" PRIX32,
                      ip->ipv4Address);
                CHECK(ip->ulPort == 0, "port %" PRIu32, ip->ulPort);
                CHECK(ip->wszTextAddress[0] == 0, "no text");
            }
            CHECK(!guid_is_null(&p->targetPortalId) && !guid_is_null(&p->initiatorAdapterId),
                  "network arm ids");
            CHECK(p->status == VDS_MPS_FAILED, "unreachable target: %d", (int)p->status);
        } else {
            other = (int)i;
            CHECK(p->type == VDS_HWT_UNKNOWN, "type %d", (int)p->type);
            CHECK(p->pHbaPortProp == NULL, "no third-union pointer");
            CHECK(guid_is_null(&p->controllerPortId) && guid_is_null(&p->hbaPortId), "zero GUIDs");
            CHECK(p->status == VDS_MPS_FAILED, "missing socket: %d", (int)p->status);
        }
    }
    CHECK(net >= 0 && other >= 0, "network and plain paths found: %d %d", net, other);
    if (a0 < 0 || a1 < 0 || b0 < 0) {
        free_path_info(paths, npaths);
        return 1;
    }
    VDS_PATH_ID id_a0 = paths[a0].pathId, id_a1 = paths[a1].pathId, id_b0 = paths[b0].pathId;
    VDS_PATH_ID ids[5];
    for (int i = 0; i < 5; i++)
        ids[i] = paths[i].pathId;
    free_path_info(paths, npaths);

    /* ---- GetLoadBalancePolicy ---- */
    VDS_LOADBALANCE_POLICY_ENUM policy = (VDS_LOADBALANCE_POLICY_ENUM)99;
    VDS_PATH_POLICY *pp = NULL;
    LONG npp = 0;
    CHECK_HR(lun->lpVtbl->GetLoadBalancePolicy(lun, NULL, &pp, &npp), E_POINTER);
    CHECK_HR(lun->lpVtbl->GetLoadBalancePolicy(lun, &policy, &pp, &npp), S_OK);
    CHECK(policy == VDS_LBP_ROUND_ROBIN, "configured policy: %d", (int)policy);
    CHECK(npp == npaths, "counts match GetPathInfo: %" PRId32, npp);
    for (LONG i = 0; i < npp && i < 5; i++)
        CHECK(memcmp(&pp[i].pathId, &ids[i], sizeof ids[i]) == 0, "same order as GetPathInfo");
    lunmpio_task_mem_free(pp);

    /* ---- SetLoadBalancePolicy ---- */
    VDS_PATH_POLICY set[2];
    memset(set, 0, sizeof set);
    set[0].pathId = id_a0;
    set[0].bPrimaryPath = 1;
    set[1].pathId = id_a1;
    set[1].bPrimaryPath = 1;
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, VDS_LBP_FAILOVER, set, -1), E_INVALIDARG);
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, VDS_LBP_FAILOVER, NULL, 1), E_INVALIDARG);
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, VDS_LBP_UNKNOWN, NULL, 0), E_INVALIDARG);
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, (VDS_LOADBALANCE_POLICY_ENUM)42, NULL, 0),
             E_INVALIDARG);
    /* Two primaries under Failover. */
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, VDS_LBP_FAILOVER, set, 2), E_INVALIDARG);
    /* An unknown path. */
    VDS_PATH_POLICY unknown = {{id_a0.ullSourceId, 0x0123456789abcdefull}, 1, 0};
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, VDS_LBP_FAILOVER, &unknown, 1),
             VDS_E_OBJECT_NOT_FOUND);
    /* The same path twice. */
    set[1].pathId = id_a0;
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, VDS_LBP_FAILOVER, set, 2), E_INVALIDARG);
    /* Nothing changed after the failures. */
    CHECK_HR(lun->lpVtbl->GetLoadBalancePolicy(lun, &policy, &pp, &npp), S_OK);
    CHECK(policy == VDS_LBP_ROUND_ROBIN, "unchanged: %d", (int)policy);
    lunmpio_task_mem_free(pp);
    /* Failover with port B's path as the one primary; port A's paths are backups, with weights. */
    VDS_PATH_POLICY fo[3] = {
        {id_b0, 1, 5},
        {id_a0, 0, 10},
        {id_a1, 0, 20},
    };
    CHECK_HR(IVdsLunMpio_SetLoadBalancePolicy(lun, VDS_LBP_FAILOVER, fo, 3), S_OK);
    CHECK_HR(lun->lpVtbl->GetLoadBalancePolicy(lun, &policy, &pp, &npp), S_OK);
    CHECK(policy == VDS_LBP_FAILOVER, "now failover: %d", (int)policy);
    for (LONG i = 0; i < npp; i++) {
        if (memcmp(&pp[i].pathId, &id_b0, sizeof id_b0) == 0)
            CHECK(pp[i].bPrimaryPath == 1 && pp[i].ulWeight == 5, "B primary, weight 5");
        else if (memcmp(&pp[i].pathId, &id_a0, sizeof id_a0) == 0)
            CHECK(pp[i].bPrimaryPath == 0 && pp[i].ulWeight == 10, "A0 backup, weight 10");
        else if (memcmp(&pp[i].pathId, &id_a1, sizeof id_a1) == 0)
            CHECK(pp[i].bPrimaryPath == 0 && pp[i].ulWeight == 20, "A1 backup, weight 20");
        else
            CHECK(pp[i].bPrimaryPath == 0, "others are backups");
    }
    lunmpio_task_mem_free(pp);
    CHECK(status_of(lun, id_b0) == VDS_MPS_ONLINE, "the primary is online");
    CHECK(status_of(lun, id_a0) == VDS_MPS_STANDBY, "a backup is standby under failover");

    /* ---- IVdsHwProviderPrivateMpio ---- */
    IVdsHwProviderPrivateMpio *prov = NULL;
    CHECK_HR(lunmpio_open_provider(socket, NULL), E_POINTER);
    CHECK_HR(lunmpio_open_provider(socket, &prov), S_OK);
    if (prov == NULL) {
        lun->lpVtbl->Release(lun);
        return 1;
    }
    {
        void *p = NULL;
        CHECK_HR(prov->lpVtbl->QueryInterface(prov, &IID_IVdsHwProviderPrivateMpio, &p), S_OK);
        CHECK(p == (void *)prov, "same object");
        p = (void *)&failures;
        CHECK_HR(prov->lpVtbl->QueryInterface(prov, &IID_IVdsLunMpio, &p), E_NOINTERFACE);
        CHECK(p == NULL, "*ppv is NULL after E_NOINTERFACE");
        CHECK_HR(IVdsHwProviderPrivateMpio_QueryInterface(prov, &IID_IUnknown, &p), S_OK);
        CHECK(prov->lpVtbl->Release(prov) == 2, "two QIs, two releases");
        CHECK(prov->lpVtbl->Release(prov) == 1, "count 1");
    }
    VDS_HBAPORT_PROP port_a;
    memset(&port_a, 0, sizeof port_a);
    port_a.wwnNode = PORT_A_NODE;
    port_a.wwnPort = PORT_A_PORT;
    port_a.type = VDS_HPT_NPORT; /* ignored: only the WWN pair matters */
    port_a.status = VDS_HPS_ONLINE;
    VDS_HBAPORT_PROP port_b = port_a;
    port_b.wwnNode = PORT_B_NODE;
    port_b.wwnPort = PORT_B_PORT;
    VDS_HBAPORT_PROP port_x = port_a;
    port_x.wwnPort.rguchWwn[7] = 0x77;

    /* Failing port A's backups leaves port B's primary: everything is set. */
    CHECK_HR(prov->lpVtbl->SetAllPathStatusesFromHbaPort(prov, port_a, VDS_MPS_FAILED), S_OK);
    CHECK(status_of(lun, id_a0) == VDS_MPS_FAILED, "A0 failed by the administrator");
    CHECK(status_of(lun, id_a1) == VDS_MPS_FAILED, "A1 failed by the administrator");
    /* Failing port B would leave the LUN without a usable path: skipped, a success code. */
    HRESULT hr = IVdsHwProviderPrivateMpio_SetAllPathStatusesFromHbaPort(prov, port_b, VDS_MPS_FAILED);
    CHECK_HR(hr, VDS_S_STATUSES_INCOMPLETELY_SET);
    CHECK(SUCCEEDED(hr), "VDS_S_STATUSES_INCOMPLETELY_SET is a success code");
    CHECK(status_of(lun, id_b0) == VDS_MPS_ONLINE, "the skipped path keeps its status");
    /* No path on that port; an invalid status. */
    CHECK_HR(prov->lpVtbl->SetAllPathStatusesFromHbaPort(prov, port_x, VDS_MPS_ONLINE),
             VDS_E_OBJECT_NOT_FOUND);
    CHECK_HR(prov->lpVtbl->SetAllPathStatusesFromHbaPort(prov, port_a, VDS_MPS_UNKNOWN), E_INVALIDARG);
    CHECK_HR(prov->lpVtbl->SetAllPathStatusesFromHbaPort(prov, port_a, (VDS_PATH_STATUS)3), E_INVALIDARG);
    /* Reinstate port A. Its paths are Failover backups: reinstated, but the policy keeps them on
     * standby — a status that conflicts with the policy, which is exactly Microsoft's case for
     * VDS_S_STATUSES_INCOMPLETELY_SET. */
    CHECK_HR(prov->lpVtbl->SetAllPathStatusesFromHbaPort(prov, port_a, VDS_MPS_ONLINE),
             VDS_S_STATUSES_INCOMPLETELY_SET);
    CHECK(status_of(lun, id_a0) == VDS_MPS_STANDBY, "A0 reinstated, standby under failover");

    /* ---- the LUN goes away while its object lives ---- */
    printf("REMOVE-LUN\n");
    fflush(stdout);
    {
        char answer[64];
        if (fgets(answer, sizeof answer, stdin) == NULL) {
            fprintf(stderr, "no answer from the harness\n");
            failures++;
        }
    }
    paths = (VDS_PATH_INFO *)&failures;
    npaths = 3;
    CHECK_HR(lun->lpVtbl->GetPathInfo(lun, &paths, &npaths), VDS_E_OBJECT_DELETED);
    CHECK(paths == NULL && npaths == 0, "outputs cleared on failure");
    flags = 1;
    CHECK_HR(lun->lpVtbl->GetSupportedLbPolicies(lun, &flags), VDS_E_OBJECT_DELETED);
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, VDS_LBP_FAILOVER, fo, 3), VDS_E_OBJECT_DELETED);
    {
        char msg[512];
        CHECK(lunmpio_last_error_message(msg, sizeof msg) > 0, "a message");
        printf("after the LUN was removed: %s\n", msg);
    }
    {
        IVdsLunMpio *gone = NULL;
        CHECK_HR(lunmpio_open_lun(socket, lun_name, &gone), VDS_E_OBJECT_NOT_FOUND);
        CHECK(gone == NULL, "no object for a LUN that does not exist");
    }

    /* ---- the daemon goes away ---- */
    printf("STOP-DAEMON\n");
    fflush(stdout);
    char line[64];
    if (fgets(line, sizeof line, stdin) == NULL) {
        fprintf(stderr, "no answer from the harness\n");
        failures++;
    }
    paths = (VDS_PATH_INFO *)&failures;
    npaths = 3;
    CHECK_HR(lun->lpVtbl->GetPathInfo(lun, &paths, &npaths), VDS_E_OBJECT_DELETED);
    CHECK(paths == NULL && npaths == 0, "outputs cleared on failure");
    pp = (VDS_PATH_POLICY *)&failures;
    policy = VDS_LBP_FAILOVER;
    CHECK_HR(lun->lpVtbl->GetLoadBalancePolicy(lun, &policy, &pp, &npp), VDS_E_OBJECT_DELETED);
    CHECK(pp == NULL && npp == 0 && policy == VDS_LBP_UNKNOWN, "outputs cleared on failure");
    CHECK_HR(lun->lpVtbl->SetLoadBalancePolicy(lun, VDS_LBP_FAILOVER, fo, 3), VDS_E_OBJECT_DELETED);
    flags = 1;
    CHECK_HR(lun->lpVtbl->GetSupportedLbPolicies(lun, &flags), VDS_E_OBJECT_DELETED);
    CHECK(flags == 0, "flags cleared on failure");
    CHECK_HR(prov->lpVtbl->SetAllPathStatusesFromHbaPort(prov, port_a, VDS_MPS_FAILED),
             VDS_E_OBJECT_DELETED);
    {
        char msg[512];
        CHECK(lunmpio_last_error_message(msg, sizeof msg) > 0, "a message");
        printf("after the daemon stopped: %s\n", msg);
    }
    IVdsLunMpio *again = NULL;
    CHECK_HR(lunmpio_open_lun(socket, lun_name, &again), VDS_E_OBJECT_DELETED);
    CHECK(again == NULL, "no object");

    /* ---- the last references ---- */
    CHECK(prov->lpVtbl->Release(prov) == 0, "provider freed");
    CHECK(lun->lpVtbl->Release(lun) == 0, "LUN freed");

    /* The task allocator itself. */
    void *block = lunmpio_task_mem_alloc(0);
    CHECK(block != NULL, "CoTaskMemAlloc(0) is a unique pointer");
    lunmpio_task_mem_free(block);
    lunmpio_task_mem_free(NULL);

    if (failures == 0)
        printf("vds_client: all checks passed\n");
    else
        printf("vds_client: %d check(s) failed\n", failures);
    return failures == 0 ? 0 : 1;
}
