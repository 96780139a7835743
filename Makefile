PORTNAME=	hast
DISTVERSION=	0.1.0
CATEGORIES=	sysutils python
MASTER_SITES=	PYPI
PKGNAMEPREFIX=	py-

MAINTAINER=	py-hast@example.org
COMMENT=	HAST (Highly Available STorage) daemon and tools in Python
WWW=		https://github.com/py-hast/py-hast

LICENSE=	BSD2CLAUSE
LICENSE_FILE=	${WRKSRC}/LICENSE

BUILD_DEPENDS=	${PYTHON_PKGNAMEPREFIX}cffi>=1.17:devel/py-cffi@${PY_FLAVOR} \
		${PYTHON_PKGNAMEPREFIX}setuptools>=61:devel/py-setuptools@${PY_FLAVOR} \
		${PYTHON_PKGNAMEPREFIX}wheel>0:devel/py-wheel@${PY_FLAVOR}
RUN_DEPENDS=	${PYTHON_PKGNAMEPREFIX}cffi>=1.17:devel/py-cffi@${PY_FLAVOR}
TEST_DEPENDS=	${PYTHON_PKGNAMEPREFIX}hypothesis>0:devel/py-hypothesis@${PY_FLAVOR}

USES=		python:3.11+
USE_PYTHON=	autoplist cython noflavors pep517 pytest
USE_RC_SUBR=	py_hastd

SUB_FILES=	hast-switch pkg-message
SUB_LIST+=	PYTHON_CMD=${PYTHON_CMD}

# Test the staged tree, not the source tree: the source package has no
# compiled extensions.  The framework's pytest target passes -o addopts=.
TEST_ENV=	${MAKE_ENV} PYTHONPATH=${STAGEDIR}${PYTHONPREFIX_SITELIBDIR}
TEST_WRKSRC=	${WRKSRC}/tests

# hastd and hastctl are the wheel's console scripts, which installer puts in
# ${PREFIX}/bin; base HAST has them in /sbin, so they belong in ${PREFIX}/sbin.
# The framework's PEP517_INSTALL_CMD is extended to move them there right
# after installer runs and to rewrite their RECORD lines to match, before
# do-install turns RECORD into the autoplist (it maps ../../../sbin/ to
# sbin/).  So the plist, the RECORD (pip, importlib.metadata) and the staged
# files agree, and no private framework variable is touched.  Rejected:
#  - a post-install move: the autoplist would still list bin/hastctl, and
#    fixing it means editing the framework's private ${_PYTHONPKGLIST};
#  - setuptools data files under sbin/: installer rewrites the #!python line
#    of scripts only, so they would need a hard-coded interpreter, which
#    also breaks rc.subr's command_interpreter process matching.
# The RECORD lines of a script look like "../../../bin/hastd,sha256=...,N".
SBIN_SCRIPTS=	hastctl hastd
WHEEL_DISTINFO=	${STAGEDIR}${PYTHONPREFIX_SITELIBDIR}/${PORTNAME}-${DISTVERSION}.dist-info
PEP517_INSTALL_CMD=	${PYTHON_CMD} -m installer --destdir ${STAGEDIR} \
			--prefix ${PREFIX} \
			${BUILD_WRKSRC}/dist/${PORTNAME}-${DISTVERSION}*.whl && \
			${MKDIR} ${STAGEDIR}${PREFIX}/sbin && \
			for s in ${SBIN_SCRIPTS}; do \
				${MV} ${STAGEDIR}${PREFIX}/bin/$$s \
				    ${STAGEDIR}${PREFIX}/sbin/$$s && \
				${REINPLACE_CMD} \
				    -e "s|^\.\./\.\./\.\./bin/$$s,|../../../sbin/$$s,|" \
				    ${WHEEL_DISTINFO}/RECORD && \
				${RM} ${WHEEL_DISTINFO}/RECORD.bak || exit 1; \
			done

post-install:
	${FIND} ${STAGEDIR}${PYTHONPREFIX_SITELIBDIR} -name '*.so' \
		-exec ${STRIP_CMD} {} +
	${INSTALL_DATA} ${FILESDIR}/hast.conf.sample \
		${STAGEDIR}${PREFIX}/etc/hast.conf.sample
	${INSTALL_DATA} ${FILESDIR}/py-hast.conf.sample \
		${STAGEDIR}${PREFIX}/etc/py-hast.conf.sample
	${INSTALL_DATA} ${FILESDIR}/devd-hast.conf.sample \
		${STAGEDIR}${PREFIX}/etc/devd-hast.conf.sample
	${INSTALL_DATA} ${FILESDIR}/keepalived-hast.conf.sample \
		${STAGEDIR}${PREFIX}/etc/keepalived-hast.conf.sample
	${INSTALL_SCRIPT} ${WRKDIR}/hast-switch \
		${STAGEDIR}${PREFIX}/sbin/hast-switch
	${INSTALL_MAN} ${WRKSRC}/man/hast.conf.5 ${WRKSRC}/man/py-hast.conf.5 \
		${STAGEDIR}${PREFIX}/share/man/man5
	${INSTALL_MAN} ${WRKSRC}/man/hastctl.8 ${WRKSRC}/man/hastd.8 \
		${STAGEDIR}${PREFIX}/share/man/man8

.include <bsd.port.mk>
