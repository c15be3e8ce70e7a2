/*
 * lunmpio_vds.h - IVdsLunMpio and IVdsHwProviderPrivateMpio for C programs on Linux.
 *
 * The VDS structures, unions, enumerations, HRESULTs, IIDs and the two interfaces as C vtables,
 * under their VDS names and values, implemented by liblunmpio_vds_com (crate lunmpio-vds-com) on
 * top of a running lunmpio daemon. See docs/VDS_C_API.md for a complete example.
 *
 * Types are fixed-width, never the LP64 C types: LONG/ULONG are 32-bit (C `long` is 64-bit on
 * Linux), BOOL is 32-bit, WCHAR is a 16-bit UTF-16 unit (Linux wchar_t is 32-bit), ULONGLONG is
 * 64-bit. The layout is the Windows x64 one and is checked below at compile time (C11).
 *
 * Memory: every array or embedded pointer a method returns is allocated with
 * lunmpio_task_mem_alloc (CoTaskMemAlloc semantics, i.e. malloc) and is freed by the caller with
 * lunmpio_task_mem_free (CoTaskMemFree semantics, i.e. free; NULL is allowed).
 *   GetPathInfo:          free each element's pHbaPortProp / pInitiatorPortalIpAddr (may be NULL),
 *                         then the array.
 *   GetLoadBalancePolicy: free the array (NULL with a count of 0 when the LUN has no paths).
 *
 * Requires a C11 compiler (anonymous unions, _Static_assert). Calling convention: the platform's
 * C ABI (STDMETHODCALLTYPE is empty on Linux).
 */
#ifndef LUNMPIO_VDS_H
#define LUNMPIO_VDS_H

#include <stddef.h>
#include <stdint.h>

#if UINTPTR_MAX != 0xFFFFFFFFFFFFFFFFu
#error "lunmpio_vds.h describes the 64-bit (Windows x64) layout; 32-bit targets are not supported"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- base types (Windows ABI widths) ---- */

typedef int32_t HRESULT;
typedef int32_t LONG;
typedef uint32_t ULONG;
typedef int32_t BOOL;
typedef uint8_t UCHAR;
typedef uint16_t WCHAR;
typedef uint64_t ULONGLONG;

typedef struct _GUID {
    uint32_t Data1;
    uint16_t Data2;
    uint16_t Data3;
    uint8_t Data4[8];
} GUID;
typedef GUID IID;
typedef GUID VDS_OBJECT_ID;
#ifndef REFIID
#define REFIID const IID *
#endif

#ifndef SUCCEEDED
#define SUCCEEDED(hr) (((HRESULT)(hr)) >= 0)
#endif
#ifndef FAILED
#define FAILED(hr) (((HRESULT)(hr)) < 0)
#endif

/* ---- HRESULTs ---- */

#define LUNMPIO_HRESULT(bits) ((HRESULT)(uint32_t)(bits))

#define S_OK                            LUNMPIO_HRESULT(0x00000000u)
#define VDS_S_STATUSES_INCOMPLETELY_SET LUNMPIO_HRESULT(0x00042702u) /* a success code */
#define E_NOINTERFACE                   LUNMPIO_HRESULT(0x80004002u)
#define E_POINTER                       LUNMPIO_HRESULT(0x80004003u)
#define E_FAIL                          LUNMPIO_HRESULT(0x80004005u)
#define E_UNEXPECTED                    LUNMPIO_HRESULT(0x8000FFFFu) /* an internal error (panic) */
#define E_OUTOFMEMORY                   LUNMPIO_HRESULT(0x8007000Eu)
#define E_INVALIDARG                    LUNMPIO_HRESULT(0x80070057u)
#define VDS_E_NOT_SUPPORTED             LUNMPIO_HRESULT(0x80042400u)
#define VDS_E_ANOTHER_CALL_IN_PROGRESS  LUNMPIO_HRESULT(0x80042404u)
#define VDS_E_OBJECT_NOT_FOUND          LUNMPIO_HRESULT(0x80042405u)
#define VDS_E_OBJECT_DELETED            LUNMPIO_HRESULT(0x8004240Bu) /* also: daemon unreachable */
#define VDS_E_PATH_NOT_FOUND            LUNMPIO_HRESULT(0x80042416u)
#define VDS_E_PROVIDER_CACHE_CORRUPT    LUNMPIO_HRESULT(0x8004241Fu)
#define VDS_E_OBJECT_STATUS_FAILED      LUNMPIO_HRESULT(0x80042431u)
#define VDS_E_BAD_PROVIDER_DATA         LUNMPIO_HRESULT(0x80042441u)
#define VDS_E_PROVIDER_FAILURE          LUNMPIO_HRESULT(0x80042442u)
#define VDS_E_INTERNAL_ERROR            LUNMPIO_HRESULT(0x80042448u)
#define VDS_E_PROVIDER_CACHE_OUTOFSYNC  LUNMPIO_HRESULT(0x80042712u)

/* ---- IIDs ---- */

/* {00000000-0000-0000-C000-000000000046} */
static const IID IID_IUnknown =
    {0x00000000, 0x0000, 0x0000, {0xC0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x46}};
/* {7c5fbae3-333a-48a1-a982-33c15788cde3} */
static const IID IID_IVdsLunMpio =
    {0x7c5fbae3, 0x333a, 0x48a1, {0xa9, 0x82, 0x33, 0xc1, 0x57, 0x88, 0xcd, 0xe3}};
/* {310a7715-ac2b-4c6f-9827-3d742f351676} */
static const IID IID_IVdsHwProviderPrivateMpio =
    {0x310a7715, 0xac2b, 0x4c6f, {0x98, 0x27, 0x3d, 0x74, 0x2f, 0x35, 0x16, 0x76}};

/* ---- enumerations (open: new values may appear; treat unknown ones as unknown) ---- */

typedef enum _VDS_PATH_STATUS {
    VDS_MPS_UNKNOWN = 0,
    VDS_MPS_ONLINE = 1,
    VDS_MPS_FAILED = 5,
    VDS_MPS_STANDBY = 7
} VDS_PATH_STATUS;

typedef enum _VDS_HWPROVIDER_TYPE {
    VDS_HWT_UNKNOWN = 0,
    VDS_HWT_PCI_RAID = 1,
    VDS_HWT_FIBRE_CHANNEL = 2,
    VDS_HWT_ISCSI = 3,
    VDS_HWT_SAS = 4,
    VDS_HWT_HYBRID = 5 /* a provider type only: never in VDS_PATH_INFO.type */
} VDS_HWPROVIDER_TYPE;

typedef enum _VDS_LOADBALANCE_POLICY_ENUM {
    VDS_LBP_UNKNOWN = 0,
    VDS_LBP_FAILOVER = 1,
    VDS_LBP_ROUND_ROBIN = 2,
    VDS_LBP_ROUND_ROBIN_WITH_SUBSET = 3,
    VDS_LBP_DYN_LEAST_QUEUE_DEPTH = 4,
    VDS_LBP_WEIGHTED_PATHS = 5,
    VDS_LBP_LEAST_BLOCKS = 6,
    VDS_LBP_VENDOR_SPECIFIC = 7
} VDS_LOADBALANCE_POLICY_ENUM;

typedef enum _VDS_PROVIDER_LBSUPPORT_FLAG {
    VDS_LBF_FAILOVER = 0x1,
    VDS_LBF_ROUND_ROBIN = 0x2,
    VDS_LBF_ROUND_ROBIN_WITH_SUBSET = 0x4,
    VDS_LBF_DYN_LEAST_QUEUE_DEPTH = 0x8,
    VDS_LBF_WEIGHTED_PATHS = 0x10,
    VDS_LBF_LEAST_BLOCKS = 0x20,
    VDS_LBF_VENDOR_SPECIFIC = 0x40
} VDS_PROVIDER_LBSUPPORT_FLAG;

typedef enum _VDS_HBAPORT_TYPE {
    VDS_HPT_UNKNOWN = 1,
    VDS_HPT_OTHER = 2,
    VDS_HPT_NOTPRESENT = 3,
    VDS_HPT_NPORT = 5,
    VDS_HPT_NLPORT = 6,
    VDS_HPT_FLPORT = 7,
    VDS_HPT_FPORT = 8,
    VDS_HPT_EPORT = 9,
    VDS_HPT_GPORT = 10,
    VDS_HPT_LPORT = 20,
    VDS_HPT_PTP = 21
} VDS_HBAPORT_TYPE;

typedef enum _VDS_HBAPORT_STATUS {
    VDS_HPS_UNKNOWN = 1,
    VDS_HPS_ONLINE = 2,
    VDS_HPS_OFFLINE = 3,
    VDS_HPS_BYPASSED = 4,
    VDS_HPS_DIAGNOSTICS = 5,
    VDS_HPS_LINKDOWN = 6,
    VDS_HPS_ERROR = 7,
    VDS_HPS_LOOPBACK = 8
} VDS_HBAPORT_STATUS;

typedef enum _VDS_HBAPORT_SPEED_FLAG {
    VDS_HSF_UNKNOWN = 0x0,
    VDS_HSF_1GBIT = 0x1,
    VDS_HSF_2GBIT = 0x2,
    VDS_HSF_10GBIT = 0x4,
    VDS_HSF_4GBIT = 0x8,
    VDS_HSF_NOT_NEGOTIATED = 0x8000
} VDS_HBAPORT_SPEED_FLAG;

typedef enum VDS_IPADDRESS_TYPE {
    VDS_IPT_TEXT = 0,
    VDS_IPT_IPV4 = 1,
    VDS_IPT_IPV6 = 2,
    VDS_IPT_EMPTY = 3
} VDS_IPADDRESS_TYPE;

/* ---- structures ---- */

typedef struct _VDS_PATH_ID {
    ULONGLONG ullSourceId; /* the LUN's source id */
    ULONGLONG ullPathId;
} VDS_PATH_ID;

typedef struct _VDS_WWN {
    UCHAR rguchWwn[8]; /* element 0 is the most significant byte */
} VDS_WWN;

typedef struct _VDS_HBAPORT_PROP {
    VDS_OBJECT_ID id; /* GUID_NULL from GetPathInfo; ignored by SetAllPathStatusesFromHbaPort */
    VDS_WWN wwnNode;
    VDS_WWN wwnPort;
    VDS_HBAPORT_TYPE type;
    VDS_HBAPORT_STATUS status;
    ULONG ulPortSpeed;          /* a VDS_HBAPORT_SPEED_FLAG value */
    ULONG ulSupportedPortSpeed; /* a mask of VDS_HBAPORT_SPEED_FLAG values */
} VDS_HBAPORT_PROP;

typedef struct _VDS_IPADDRESS {
    VDS_IPADDRESS_TYPE type;
    ULONG ipv4Address; /* numeric value: octet 0 in bits 24-31 (10.0.2.5 is 0x0A000205) */
    UCHAR ipv6Address[16];
    ULONG ulIpv6FlowInfo;
    ULONG ulIpv6ScopeId;
    WCHAR wszTextAddress[256 + 1]; /* UTF-16, NUL-terminated */
    ULONG ulPort;
} VDS_IPADDRESS;

typedef struct _VDS_PATH_INFO {
    VDS_PATH_ID pathId;
    VDS_HWPROVIDER_TYPE type; /* selects the union arms: see docs/VDS_C_API.md */
    VDS_PATH_STATUS status;
    union {
        VDS_OBJECT_ID controllerPortId; /* HBA paths (Fibre Channel, SAS, PCI RAID) */
        VDS_OBJECT_ID targetPortalId;   /* network (iSCSI-like) paths */
    };
    union {
        VDS_OBJECT_ID hbaPortId;
        VDS_OBJECT_ID initiatorAdapterId;
    };
    union {
        VDS_HBAPORT_PROP *pHbaPortProp;       /* its own task-memory block, or NULL */
        VDS_IPADDRESS *pInitiatorPortalIpAddr; /* its own task-memory block, or NULL */
    };
} VDS_PATH_INFO;

typedef struct _VDS_PATH_POLICY {
    VDS_PATH_ID pathId;
    BOOL bPrimaryPath;
    ULONG ulWeight; /* lower is preferred; used by VDS_LBP_WEIGHTED_PATHS */
} VDS_PATH_POLICY;

/* ---- interfaces ---- */

typedef struct IVdsLunMpio IVdsLunMpio;
typedef struct IVdsHwProviderPrivateMpio IVdsHwProviderPrivateMpio;

typedef struct IVdsLunMpioVtbl {
    HRESULT (*QueryInterface)(IVdsLunMpio *This, REFIID riid, void **ppvObject);
    ULONG (*AddRef)(IVdsLunMpio *This);
    ULONG (*Release)(IVdsLunMpio *This);
    HRESULT (*GetPathInfo)(IVdsLunMpio *This, VDS_PATH_INFO **ppPaths, LONG *plNumberOfPaths);
    HRESULT (*GetLoadBalancePolicy)(IVdsLunMpio *This, VDS_LOADBALANCE_POLICY_ENUM *pPolicy,
                                    VDS_PATH_POLICY **ppPaths, LONG *plNumberOfPaths);
    HRESULT (*SetLoadBalancePolicy)(IVdsLunMpio *This, VDS_LOADBALANCE_POLICY_ENUM policy,
                                    VDS_PATH_POLICY *pPaths, LONG lNumberOfPaths);
    HRESULT (*GetSupportedLbPolicies)(IVdsLunMpio *This, ULONG *pulLbFlags);
} IVdsLunMpioVtbl;

struct IVdsLunMpio {
    const IVdsLunMpioVtbl *lpVtbl;
};

typedef struct IVdsHwProviderPrivateMpioVtbl {
    HRESULT (*QueryInterface)(IVdsHwProviderPrivateMpio *This, REFIID riid, void **ppvObject);
    ULONG (*AddRef)(IVdsHwProviderPrivateMpio *This);
    ULONG (*Release)(IVdsHwProviderPrivateMpio *This);
    /* hbaPortProp is passed BY VALUE; only wwnNode and wwnPort are used. */
    HRESULT (*SetAllPathStatusesFromHbaPort)(IVdsHwProviderPrivateMpio *This,
                                             VDS_HBAPORT_PROP hbaPortProp, VDS_PATH_STATUS status);
} IVdsHwProviderPrivateMpioVtbl;

struct IVdsHwProviderPrivateMpio {
    const IVdsHwProviderPrivateMpioVtbl *lpVtbl;
};

#ifdef COBJMACROS
#define IVdsLunMpio_QueryInterface(This, riid, ppv) ((This)->lpVtbl->QueryInterface(This, riid, ppv))
#define IVdsLunMpio_AddRef(This) ((This)->lpVtbl->AddRef(This))
#define IVdsLunMpio_Release(This) ((This)->lpVtbl->Release(This))
#define IVdsLunMpio_GetPathInfo(This, ppPaths, plNumberOfPaths) \
    ((This)->lpVtbl->GetPathInfo(This, ppPaths, plNumberOfPaths))
#define IVdsLunMpio_GetLoadBalancePolicy(This, pPolicy, ppPaths, plNumberOfPaths) \
    ((This)->lpVtbl->GetLoadBalancePolicy(This, pPolicy, ppPaths, plNumberOfPaths))
#define IVdsLunMpio_SetLoadBalancePolicy(This, policy, pPaths, lNumberOfPaths) \
    ((This)->lpVtbl->SetLoadBalancePolicy(This, policy, pPaths, lNumberOfPaths))
#define IVdsLunMpio_GetSupportedLbPolicies(This, pulLbFlags) \
    ((This)->lpVtbl->GetSupportedLbPolicies(This, pulLbFlags))
#define IVdsHwProviderPrivateMpio_QueryInterface(This, riid, ppv) \
    ((This)->lpVtbl->QueryInterface(This, riid, ppv))
#define IVdsHwProviderPrivateMpio_AddRef(This) ((This)->lpVtbl->AddRef(This))
#define IVdsHwProviderPrivateMpio_Release(This) ((This)->lpVtbl->Release(This))
#define IVdsHwProviderPrivateMpio_SetAllPathStatusesFromHbaPort(This, hbaPortProp, status) \
    ((This)->lpVtbl->SetAllPathStatusesFromHbaPort(This, hbaPortProp, status))
#endif

/* ---- entry points ---- */

/* An IVdsLunMpio for LUN `lun_name` of the daemon on `control_socket`, with one reference.
 * VDS_E_OBJECT_NOT_FOUND: no such LUN; VDS_E_OBJECT_DELETED: daemon unreachable;
 * E_POINTER: a NULL argument; E_INVALIDARG: an empty or non-UTF-8 name. *out is NULL on failure. */
HRESULT lunmpio_open_lun(const char *control_socket, const char *lun_name, IVdsLunMpio **out);

/* An IVdsHwProviderPrivateMpio for the daemon on `control_socket` (all of its LUNs), one reference. */
HRESULT lunmpio_open_provider(const char *control_socket, IVdsHwProviderPrivateMpio **out);

/* CoTaskMemAlloc / CoTaskMemFree: malloc / free semantics; free(NULL) is a no-op. */
void *lunmpio_task_mem_alloc(size_t cb);
void lunmpio_task_mem_free(void *pv);

/* The message behind this thread's last failed call, NUL-terminated and truncated to `size` bytes;
 * returns its full length (0 after a success). `buf` may be NULL when `size` is 0. */
size_t lunmpio_last_error_message(char *buf, size_t size);

/* ---- layout checks: the Windows x64 figures (the Rust side asserts the same numbers) ---- */

#ifndef __cplusplus
#define LUNMPIO_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#else
#define LUNMPIO_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#endif

LUNMPIO_STATIC_ASSERT(sizeof(GUID) == 16, "GUID is 16 bytes");
LUNMPIO_STATIC_ASSERT(sizeof(VDS_PATH_STATUS) == 4 && sizeof(VDS_HWPROVIDER_TYPE) == 4 &&
                          sizeof(VDS_LOADBALANCE_POLICY_ENUM) == 4 && sizeof(VDS_HBAPORT_TYPE) == 4 &&
                          sizeof(VDS_HBAPORT_STATUS) == 4 && sizeof(VDS_IPADDRESS_TYPE) == 4,
                      "VDS enums are 32-bit");
LUNMPIO_STATIC_ASSERT(sizeof(VDS_PATH_ID) == 16, "VDS_PATH_ID is 16 bytes (not mingw's UINT64)");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_PATH_ID, ullPathId) == 8, "VDS_PATH_ID.ullPathId at 8");
LUNMPIO_STATIC_ASSERT(sizeof(VDS_WWN) == 8, "VDS_WWN is 8 bytes");
LUNMPIO_STATIC_ASSERT(sizeof(VDS_HBAPORT_PROP) == 48, "VDS_HBAPORT_PROP is 48 bytes");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_HBAPORT_PROP, wwnNode) == 16, "wwnNode at 16");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_HBAPORT_PROP, wwnPort) == 24, "wwnPort at 24");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_HBAPORT_PROP, type) == 32, "type at 32");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_HBAPORT_PROP, status) == 36, "status at 36");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_HBAPORT_PROP, ulPortSpeed) == 40, "ulPortSpeed at 40");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_HBAPORT_PROP, ulSupportedPortSpeed) == 44,
                      "ulSupportedPortSpeed at 44");
LUNMPIO_STATIC_ASSERT(sizeof(VDS_IPADDRESS) == 552, "VDS_IPADDRESS is 552 bytes");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_IPADDRESS, ipv4Address) == 4, "ipv4Address at 4");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_IPADDRESS, ipv6Address) == 8, "ipv6Address at 8");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_IPADDRESS, ulIpv6FlowInfo) == 24, "ulIpv6FlowInfo at 24");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_IPADDRESS, ulIpv6ScopeId) == 28, "ulIpv6ScopeId at 28");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_IPADDRESS, wszTextAddress) == 32, "wszTextAddress at 32");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_IPADDRESS, ulPort) == 548, "ulPort at 548");
LUNMPIO_STATIC_ASSERT(sizeof(VDS_PATH_INFO) == 64, "VDS_PATH_INFO is 64 bytes");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_PATH_INFO, type) == 16, "type at 16");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_PATH_INFO, status) == 20, "status at 20");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_PATH_INFO, controllerPortId) == 24 &&
                          offsetof(VDS_PATH_INFO, targetPortalId) == 24,
                      "first union at 24");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_PATH_INFO, hbaPortId) == 40 &&
                          offsetof(VDS_PATH_INFO, initiatorAdapterId) == 40,
                      "second union at 40");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_PATH_INFO, pHbaPortProp) == 56 &&
                          offsetof(VDS_PATH_INFO, pInitiatorPortalIpAddr) == 56,
                      "third union at 56");
LUNMPIO_STATIC_ASSERT(sizeof(VDS_PATH_POLICY) == 24, "VDS_PATH_POLICY is 24 bytes");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_PATH_POLICY, bPrimaryPath) == 16, "bPrimaryPath at 16");
LUNMPIO_STATIC_ASSERT(offsetof(VDS_PATH_POLICY, ulWeight) == 20, "ulWeight at 20");
LUNMPIO_STATIC_ASSERT(sizeof(IVdsLunMpioVtbl) == 7 * sizeof(void (*)(void)), "7 slots");
LUNMPIO_STATIC_ASSERT(sizeof(IVdsHwProviderPrivateMpioVtbl) == 4 * sizeof(void (*)(void)),
                      "4 slots");

#ifdef __cplusplus
}
#endif

#endif /* LUNMPIO_VDS_H */
